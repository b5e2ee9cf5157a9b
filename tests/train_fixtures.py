"""Spans with a known ground truth, for the training pipeline's tests.

``write_span`` writes one join output (DESIGN.md, "Join outputs"): gzip TFRecords of tf.Examples
encoded by the contract's own ``transforms.examples.joined_to_example`` under
``examples/{train,eval}/``, split by ``transforms.split.is_eval``, and a ``manifest.json`` written
last. Labels are drawn from a known logistic model of the features, so a test knows the AUC the
true probabilities reach on the eval split (the best a model can hope for).

Decisions come from a known logging policy, epsilon-greedy over the true probability (send when
it is at least ``LOGGING_THRESHOLD``, otherwise hold; with probability ``LOGGING_EPSILON`` a coin
flip instead), and every example carries its decision provenance: ``decision`` (int64),
``propensity`` (float, the logging policy's probability of that decision), ``arm`` and
``model_id`` (bytes). A click is only possible on a sent notification, so an unsent decision's
label is the default 0 whatever its probability: the label is observable only when decision == 1
(examples/notify.yaml's ``label.observable_when``), and ``SpanTruth.eval_auc`` is measured on
those rows.

    >>> truth = write_span(tmp / "notify" / "2026-11-01", blueprint, n=1500, seed=1)
    >>> round(truth.eval_auc, 2)
    0.73
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from loopline.blueprint import Blueprint
from loopline.events import DecisionEvent
from loopline.examples import features_to_example
from transforms.examples import joined_to_example
from transforms.join import DEFAULT, OBSERVED, JoinedDecision
from transforms.split import is_eval

COUNTRIES = ("KR", "US", "DE", "BR", "IN")
PLATFORMS = ("ios", "android", "web")
TOPICS = ("sports", "news", "deals", "music")
DAY_MS = 86_400_000
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
# The logging policy: send when P(click) >= 0.3 (about 58% of decisions), explore with 30%.
LOGGING_THRESHOLD = 0.3
LOGGING_EPSILON = 0.3
LOGGING_MODEL_ID = "notify-logging"
LOGGING_ARM = "production"
PROFILE_BASE_LOGIT = -2.2  # a typical user's click rate (about 10%) in their profile


def random_features(rng: random.Random) -> dict:
    """Decision-time features of the example blueprint (examples/notify.yaml)."""
    features = {
        "user_id": f"u-{rng.randrange(400)}",
        "tenure_days": rng.randrange(0, 2000),
        "country": rng.choice(COUNTRIES),
        "platform": rng.choice(PLATFORMS),
        "hour_of_day": rng.randrange(24),
        "sends_last_7d": rng.randrange(0, 15),
        "open_rate_30d": rng.random(),
        "recent_clicks": [float(rng.choice((0, 0, 0, 1, 1, 2, 3))) for _ in range(7)],
        "topics": rng.sample(TOPICS, rng.randrange(1, 4)),
        "email": f"user{rng.randrange(400)}@example.com",
    }
    return {**features, **profile(features["user_id"], features["topics"], TOPICS)}


def profile(user_id: str, topics: list[str], known_topics: tuple[str, ...]) -> dict:
    """The user-profile features of the example blueprint, stable per user and drawn from no
    shared random stream (so the other features' draws stay as they were). As in the notify
    simulator, the click rate reads the user's taste (a logit shift in [-0.5, 0.5])."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    favourite = known_topics[digest[0] % len(known_topics)]
    taste = digest[1] / 255 - 0.5
    return {
        "click_rate_90d": round(1.0 / (1.0 + math.exp(-(PROFILE_BASE_LOGIT + taste))), 4),
        "favourite_topic": favourite,
        "favourite_topic_match": int(favourite in topics),
    }


def true_probability(features: dict) -> float:
    """The ground truth: P(click | features), a logistic model of a few features and the user's
    profile (their taste, read back from their click rate, and their favourite topic)."""
    rate = features["click_rate_90d"]
    logit = (
        -1.6
        + (math.log(rate / (1 - rate)) - PROFILE_BASE_LOGIT)
        + 0.8 * features["favourite_topic_match"]
        + 3.0 * (features["open_rate_30d"] - 0.5)
        + 0.9 * (features["platform"] == "ios")
        - 0.8 * (features["platform"] == "web")
        + 0.6 * (sum(features["recent_clicks"]) / 7 - 1.0)
        + 1.0 * ("deals" in features["topics"])
        + 0.5 * (features["country"] == "KR")
        - 0.08 * (features["sends_last_7d"] - 7)
    )
    return 1.0 / (1.0 + math.exp(-logit))


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def logging_decision(p: float, rng: random.Random) -> tuple[int, float]:
    """The logging policy's decision for a true probability ``p``, and its propensity."""
    greedy = int(p >= LOGGING_THRESHOLD)
    explored = rng.random() < LOGGING_EPSILON
    decision = int(rng.random() < 0.5) if explored else greedy
    propensity = 1 - LOGGING_EPSILON / 2 if decision == greedy else LOGGING_EPSILON / 2
    return decision, propensity


@dataclass(frozen=True)
class SpanTruth:
    """What a fixture span holds: its path, sizes, and the ground truth on its eval split.

    ``eval_auc`` is the AUC of the true probabilities against the labels of the observable eval
    rows (the sent ones), the best a model can reach there."""

    path: Path
    n_train: int
    n_eval: int
    eval_auc: float
    eval_features: tuple[dict, ...]
    eval_labels: tuple[int, ...]
    eval_probabilities: tuple[float, ...]
    eval_decisions: tuple[int, ...]

    @property
    def eval_observable(self) -> tuple[int, ...]:
        """Indices of the eval rows whose label is observable (decision == 1)."""
        return tuple(i for i, d in enumerate(self.eval_decisions) if d == 1)


def write_span(
    path: Path,
    blueprint: Blueprint,
    n: int,
    seed: int,
    day: int = 0,
    key: bytes = b"test-key-not-a-secret",
    shuffle_train_labels: bool = False,
    drop_feature_every: tuple[str, int] | None = None,
    provenance: bool = True,
) -> SpanTruth:
    """Writes one span of ``n`` decisions; returns its ground truth.

    ``shuffle_train_labels`` permutes the train split's labels (a worse candidate: it learns
    noise, while the eval split keeps true labels); ``drop_feature_every=(name, k)`` removes
    that feature from every k-th example (an anomaly ExampleValidator must catch);
    ``provenance=False`` writes examples without the provenance columns (a span written before
    the join recorded them).
    """
    rng = random.Random(seed)
    split = {"train": [], "eval": []}
    for i in range(n):
        features = random_features(rng)
        p = true_probability(features)
        sent, propensity = logging_decision(p, rng)
        label = int(rng.random() < p) if sent else 0
        decision = DecisionEvent(
            decision_id=f"d-{seed}-{i}",
            decision_type=blueprint.name,
            event_time_ms=START_MS + day * DAY_MS + i * 1000,
            features=features,
            blueprint_version=blueprint.version,
            decision=sent,
            model_id=LOGGING_MODEL_ID,
            propensity=propensity,
        )
        observed = label == 1 or (sent and rng.random() < 0.2)
        joined = JoinedDecision(
            decision=decision,
            label=label,
            join_status=OBSERVED if observed else DEFAULT,
            observations_used=int(observed),
            label_delays_ms=(60_000,) if observed else (),
            observation_offsets_ms=(60_000,) if observed else (),
        )
        name = "eval" if is_eval(decision.decision_id, blueprint.eval_fraction) else "train"
        split[name].append((features, label, p, joined))
    if shuffle_train_labels:  # among the sent decisions: an unsent one still cannot be clicked
        sent_rows = [i for i, (*_, j) in enumerate(split["train"]) if j.decision.decision == 1]
        labels = [split["train"][i][1] for i in sent_rows]
        rng.shuffle(labels)
        for i, label in zip(sent_rows, labels, strict=True):
            f, _, p, j = split["train"][i]
            split["train"][i] = (f, label, p, _relabel(j, label))
    for name, rows in split.items():
        directory = path / "examples" / name
        directory.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(
            str(directory / "part-00000-of-00001.tfrecord.gz"), options="GZIP"
        ) as writer:
            for i, (_, _, _, joined) in enumerate(rows):
                example = joined_to_example(joined, blueprint, key)
                _add_provenance(example, joined)
                if not provenance:
                    for column in ("decision", "propensity", "arm", "model_id"):
                        del example.features.feature[column]
                if drop_feature_every and i % drop_feature_every[1] == drop_feature_every[1] - 1:
                    del example.features.feature[drop_feature_every[0]]
                writer.write(example.SerializeToString())
    all_rows = split["train"] + split["eval"]
    observed = sum(1 for *_, j in all_rows if j.join_status == OBSERVED)
    manifest = {
        "blueprint": blueprint.summary(),
        "decisions_in": n,
        "examples_written": n,
        "examples_observed": observed,
        "examples_default": n - observed,
        "duplicate_decisions": 0,
        "rejected_decisions": 0,
        "examples_train": len(split["train"]),
        "examples_eval": len(split["eval"]),
        "reconciles": True,
        "written_by": "tests/train_fixtures.py",
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    evals = split["eval"]
    sent = [row for row in evals if row[3].decision.decision == 1]
    return SpanTruth(
        path=path,
        n_train=len(split["train"]),
        n_eval=len(evals),
        eval_auc=auc([p for _, _, p, _ in sent], [label for _, label, _, _ in sent]),
        eval_features=tuple(f for f, *_ in evals),
        eval_labels=tuple(label for _, label, _, _ in evals),
        eval_probabilities=tuple(p for _, _, p, _ in evals),
        eval_decisions=tuple(j.decision.decision for *_, j in evals),
    )


def _add_provenance(example: tf.train.Example, joined: JoinedDecision) -> None:
    """The decision-provenance columns every example carries (issue 14): those the join's
    encoder does not write yet are added here, with the decision's values."""
    feature = example.features.feature
    decision = joined.decision
    if "decision" not in feature:
        feature["decision"].int64_list.value.append(decision.decision)
    if "propensity" not in feature:
        feature["propensity"].float_list.value.append(decision.propensity)
    if "arm" not in feature:
        feature["arm"].bytes_list.value.append(LOGGING_ARM.encode())
    if "model_id" not in feature:
        feature["model_id"].bytes_list.value.append(decision.model_id.encode())


def _relabel(joined: JoinedDecision, label: int) -> JoinedDecision:
    return JoinedDecision(
        decision=joined.decision,
        label=label,
        join_status=joined.join_status,
        observations_used=joined.observations_used,
        label_delays_ms=joined.label_delays_ms,
        observation_offsets_ms=joined.observation_offsets_ms,
    )


def serialized_features(features: list[dict], blueprint: Blueprint, key: bytes) -> list[bytes]:
    """Raw serving inputs: what bulk scoring feeds the model (no label, no join columns)."""
    return [features_to_example(f, blueprint, key).SerializeToString() for f in features]
