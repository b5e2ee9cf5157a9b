"""Small real SavedModels with the serving contract, and decision events to score with them.

The model is a genuine TF SavedModel, exported the way the Pusher exports one: its
``serving_default`` signature takes serialized raw ``tf.Example``s (``features_to_example``'s
encoding), applies Transform-like preprocessing inside the graph (z-scores for numbers, hash
buckets and embeddings for strings, pooled lists) and returns ``{"score": float32[batch]}``.
The benchmark uses the same builder with a larger MLP.

    >>> path = export_scoring_model(blueprint, tmp_path / "serving" / "1")
    >>> score_serialized(path, [example.SerializeToString()])
    array([0.52...], dtype=float32)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from loopline import registry
from loopline.blueprint import Blueprint
from loopline.events import DecisionEvent, format_event_time
from loopline.examples import features_to_example
from tests.train_fixtures import profile

START_MS = 1_793_534_400_000  # 2026-11-01T12:00:00Z
COUNTRIES = ("KR", "US", "DE", "BR", "IN", "JP")
PLATFORMS = ("ios", "android", "web")
TOPICS = ("sale", "news", "social", "reminder", "sports")


def _feature_spec(blueprint: Blueprint) -> dict:
    dtypes = {"int": tf.int64, "float": tf.float32, "string": tf.string}
    spec = {}
    for feature in blueprint.example_features:
        dtype = dtypes[feature.base_type]
        if feature.is_list:
            spec[feature.name] = tf.io.RaggedFeature(dtype=dtype, row_splits_dtype=tf.int64)
        else:
            spec[feature.name] = tf.io.FixedLenFeature([], dtype)
    return spec


class ScoringModel(tf.Module):
    """An MLP over Transform-like preprocessed raw features, exporting the serving contract."""

    def __init__(
        self,
        blueprint: Blueprint,
        hidden_units: Sequence[int] = (16,),
        buckets: int = 64,
        embedding_dim: int = 4,
        seed: int = 0,
        fail_on_country: str | None = None,
    ):
        super().__init__()
        rng = np.random.default_rng(seed)
        self._spec = _feature_spec(blueprint)
        self._features = blueprint.example_features
        self._buckets = buckets
        self._fail_on_country = fail_on_country
        width = 0
        self._embeddings = {}
        for feature in self._features:
            if feature.base_type == "string":
                table = rng.normal(0, 0.5, (buckets, embedding_dim)).astype(np.float32)
                self._embeddings[feature.name] = tf.Variable(table, name=f"emb_{feature.name}")
                width += embedding_dim
            else:
                width += 2 if feature.is_list else 1  # lists pool to (mean, count)
        self._layers = []
        for units in (*hidden_units, 1):
            w = rng.normal(0, (2.0 / width) ** 0.5, (width, units)).astype(np.float32)
            b = rng.normal(0, 0.1, (units,)).astype(np.float32)
            self._layers.append((tf.Variable(w), tf.Variable(b)))
            width = units

    @property
    def parameter_count(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.trainable_variables))

    def _columns(self, parsed: dict) -> list[tf.Tensor]:
        columns = []
        for feature in self._features:
            value = parsed[feature.name]
            if feature.base_type == "string":
                ids = tf.strings.to_hash_bucket_fast(value, self._buckets)
                table = self._embeddings[feature.name]
                if feature.is_list:
                    pooled = tf.reduce_mean(tf.ragged.map_flat_values(tf.gather, table, ids), 1)
                    columns.append(tf.where(tf.math.is_nan(pooled), 0.0, pooled))
                else:
                    columns.append(tf.gather(table, ids))
            elif feature.is_list:
                value = tf.cast(value, tf.float32)
                count = tf.cast(value.row_lengths(), tf.float32)
                mean = tf.reduce_sum(value, 1) / tf.maximum(count, 1.0)
                columns.append(tf.stack([mean, tf.math.log1p(count)], 1))
            else:
                # A fixed z-score, as tft.scale_to_z_score would bake into the graph.
                columns.append(tf.math.tanh(tf.cast(value, tf.float32) / 50.0)[:, None])
        return columns

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples: tf.Tensor) -> dict:
        parsed = tf.io.parse_example(examples, self._spec)
        if self._fail_on_country is not None:
            tf.debugging.assert_none_equal(
                parsed["country"],
                tf.constant(self._fail_on_country),
                message=f"model refuses country {self._fail_on_country}",
            )
        x = tf.concat(self._columns(parsed), axis=1)
        for i, (w, b) in enumerate(self._layers):
            x = tf.matmul(x, w) + b
            if i < len(self._layers) - 1:
                x = tf.nn.relu(x)
        return {"score": tf.sigmoid(tf.reshape(x, [-1]))}


def export_scoring_model(
    blueprint: Blueprint, version_dir: str | Path, production: bool = True, **kwargs
) -> Path:
    """Exports a ScoringModel to ``version_dir`` (SERVING_DIR/<version>) with its model record,
    registered in the serving dir's registry and, with ``production`` (the default), promoted
    to production there, as a model that won its rollout would be: the last model exported
    this way is what scoring resolves by default.

    Keyword arguments go to ScoringModel (hidden_units, buckets, embedding_dim, seed,
    fail_on_country).
    """
    version_dir = Path(version_dir)
    model = ScoringModel(blueprint, **kwargs)
    tf.saved_model.save(model, str(version_dir), signatures={"serving_default": model.serve})
    name = f"{blueprint.name}-{version_dir.name}"
    record = {
        "model_id": name,
        "name": name,
        "version": version_dir.name,
        "blessed": True,
        "pushed": True,
        "blueprint": blueprint.summary(),
        "parameters": model.parameter_count,
    }
    record_path = version_dir.parent / f"{version_dir.name}.record.json"
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    serving = str(version_dir.parent)
    registry.register(serving, record, replace_challenger=True)
    if production:
        registry.promote(serving, "exported for a test", challenger=name)
    return version_dir


def score_serialized(version_dir: str | Path, serialized: Sequence[bytes]) -> np.ndarray:
    """The model's own scores for serialized examples, called directly (the reference)."""
    loaded = tf.saved_model.load(str(version_dir))
    out = loaded.signatures["serving_default"](examples=tf.constant(list(serialized)))
    return out["score"].numpy()


def make_decisions(
    blueprint: Blueprint, n: int, seed: int = 0, prefix: str = "d"
) -> list[DecisionEvent]:
    """``n`` valid decision events for the example blueprint (notify), deterministic for a seed."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        features = {
            "user_id": f"u-{rng.randrange(10_000)}",
            "tenure_days": rng.randrange(0, 2000),
            "country": rng.choice(COUNTRIES),
            "platform": rng.choice(PLATFORMS),
            "hour_of_day": rng.randrange(24),
            "sends_last_7d": rng.randrange(20),
            "open_rate_30d": round(rng.random(), 4),
            "recent_clicks": [float(rng.randrange(4)) for _ in range(rng.randrange(0, 8))],
            "topics": rng.sample(TOPICS, rng.randrange(0, 3)),
            "email": f"user{i}@example.com",
        }
        features.update(profile(features["user_id"], features["topics"], TOPICS))
        features = {f.name: features[f.name] for f in blueprint.features}
        events.append(
            DecisionEvent(
                decision_id=f"{prefix}-{i:06d}",
                decision_type=blueprint.name,
                event_time_ms=START_MS + i * 1000,
                features=features,
                blueprint_version=blueprint.version,
            )
        )
    return events


def read_json_lines(directory: str | Path) -> list[dict]:
    """Every JSON line of the ``*.jsonl`` files in ``directory`` (an output of a job)."""
    return [
        json.loads(line)
        for f in sorted(Path(directory).glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def expected_scores(
    events: Sequence[DecisionEvent], blueprint: Blueprint, key: bytes, version_dir: str | Path
) -> dict[str, float]:
    """Each decision's score by the model in ``version_dir`` itself, encoded as the join does."""
    serialized = [
        features_to_example(e.features, blueprint, key).SerializeToString() for e in events
    ]
    scores = score_serialized(version_dir, serialized)
    return {e.decision_id: float(s) for e, s in zip(events, scores, strict=True)}


def bulk_score_in_processes(args: Sequence[str], pii_key: str) -> subprocess.CompletedProcess:
    """``python -m pipelines.bulk_score ARGS`` as Dataflow and the Flex Template launcher run
    it: the module is ``__main__``, and the DirectRunner runs the DoFns in two other processes
    (``multi_processing``), which see this checkout first on their path."""
    repo = Path(__file__).resolve().parent.parent
    argv = [
        sys.executable, "-m", "pipelines.bulk_score", *args,
        "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "LOOPLINE_PII_KEY": pii_key}
    return subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def write_decision_lines(
    path: str | Path, events: Sequence[DecisionEvent], extra: Sequence[str] = ()
) -> Path:
    """Writes events as JSON lines (plus raw ``extra`` lines, e.g. corrupt ones)."""
    path = Path(path)
    lines = [e.to_json() for e in events] + list(extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = [
    "ScoringModel",
    "bulk_score_in_processes",
    "expected_scores",
    "export_scoring_model",
    "format_event_time",
    "make_decisions",
    "read_json_lines",
    "score_serialized",
    "write_decision_lines",
]
