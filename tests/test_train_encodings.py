"""How numeric features reach the model: ``model.encodings`` in the blueprint (trainer_module).

The notify blueprint's hour of day is a clock, not a quantity (the night and the evening differ,
noon is not between them), and its tenure and counts are heavy-tailed: the transformed values
are checked through a real Transform run (tensorflow_transform's Beam implementation) on a few
rows.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipelines import train_config, trainer_module  # noqa: E402

FEATURES = [
    {"name": "hour_of_day", "type": "int"},
    {"name": "tenure_days", "type": "int"},
    {"name": "recent_clicks", "type": "float_list"},
    {"name": "country", "type": "string"},
]


def _config(encodings: dict) -> dict:
    return {
        "features": FEATURES,
        "hashed": [],
        "label": {"name": "clicked", "type": "int", "observable_when": {}, "ips_clip": 10.0},
        "model": {"encodings": encodings},
    }


def test_notify_blueprint_gives_the_hour_of_day_its_own_vocabulary(blueprint):
    plan = trainer_module.transformed_features(train_config.custom_config(blueprint))
    assert plan["hour_of_day"] == (trainer_module.CATEGORICAL, "hour_of_day_vocab")
    assert plan["tenure_days"] == (trainer_module.NUMERIC, None)


def test_a_feature_without_an_encoding_keeps_its_z_score():
    plan = trainer_module.transformed_features(_config({}))
    assert plan["hour_of_day"] == (trainer_module.NUMERIC, None)


@pytest.mark.parametrize(
    "encodings, words",
    [
        ({"hour_of_day": "onehot"}, "'onehot' is not one of zscore, log, categorical"),
        ({"country": "log"}, "not a numeric feature"),
        ({"no_such_feature": "log"}, "not a numeric feature"),
        ({"recent_clicks": "categorical"}, "only int features can be categorical"),
    ],
)
def test_bad_encoding_is_named(encodings, words):
    with pytest.raises(ValueError, match=f"model.encodings.{next(iter(encodings))}: .*{words}"):
        trainer_module.model_settings(_config(encodings))


def _transform(rows: list[dict], config: dict) -> list[dict]:
    """Runs preprocessing_fn with Transform's Beam implementation over ``rows``."""
    import tempfile

    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    spec = {
        "hour_of_day": tf.io.FixedLenFeature([], tf.int64),
        "tenure_days": tf.io.FixedLenFeature([], tf.int64),
        "recent_clicks": tf.io.VarLenFeature(tf.float32),
        "country": tf.io.FixedLenFeature([], tf.string),
    }
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        (transformed, _), _ = (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(
            lambda inputs: trainer_module.preprocessing_fn(inputs, config)
        )
    return transformed


@pytest.mark.slow
def test_categorical_hours_get_one_id_per_hour_and_log_scaled_counts_a_z_score_of_log1p():
    tenures = [1, 10, 100, 1000, 10000, 5]
    hours = [0, 12, 23, 12, 0, 7]
    rows = [
        {"hour_of_day": h, "tenure_days": t, "recent_clicks": [float(t % 3), 1.0], "country": b"KR"}
        for h, t in zip(hours, tenures, strict=True)
    ]
    config = _config({"hour_of_day": "categorical", "tenure_days": "log", "recent_clicks": "log"})
    out = _transform(rows, config)
    ids = [int(row["hour_of_day"]) for row in out]
    # Equal hours share an id, different hours never do: no order between them is implied.
    assert len(set(zip(hours, ids, strict=True))) == len(set(hours)) == len(set(ids))
    assert [float(row["tenure_days"]) for row in out] == pytest.approx(
        _z_scores([math.log1p(t) for t in tenures]), abs=1e-4
    )
    list_means = [(t % 3 + 1.0) / 2 for t in tenures]
    assert [float(row["recent_clicks__mean"]) for row in out] == pytest.approx(
        _z_scores([math.log1p(v) for v in list_means]), abs=1e-4
    )


def _z_scores(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / sd for v in values]
