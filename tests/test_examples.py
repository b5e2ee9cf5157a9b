"""tf.Example encoding: read back with TensorFlow, typed, and private.

The feature encoding is loopline/examples.py, the join's examples transforms/examples.py.
"""

import hashlib
import hmac

import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline.blueprint import parse_blueprint
from loopline.events import DecisionEvent
from loopline.examples import (
    PiiKeyMissing,
    features_to_example,
    features_to_examples,
    pii_key,
    pseudonymise,
)
from transforms.examples import joined_to_example, joined_to_examples
from transforms.join import DEFAULT, OBSERVED, JoinedDecision

FEATURES = {
    "user_id": "user-8841",
    "tenure_days": 120,
    "country": "KR",
    "platform": "ios",
    "hour_of_day": 13,
    "sends_last_7d": 4,
    "open_rate_30d": 0.25,
    "recent_clicks": [1.0, 0.0, 2.0],
    "topics": ["sale", "news"],
    "click_rate_90d": 0.12,
    "favourite_topic": "news",
    "favourite_topic_match": 1,
    "email": "someone@example.com",
}


def _decision(**overrides) -> DecisionEvent:
    fields = dict(
        decision_id="d-123",
        decision_type="notify",
        event_time_ms=1_793_534_400_000,
        features=dict(FEATURES),
    )
    fields.update(overrides)
    return DecisionEvent(**fields)


def _joined(decision: DecisionEvent, label=1, status=OBSERVED) -> JoinedDecision:
    return JoinedDecision(decision, label, status, 1, (1000,), (1000,))


def _parse(example: tf.train.Example, spec: dict) -> dict:
    return tf.io.parse_single_example(example.SerializeToString(), spec)


def test_features_read_back_with_tensorflow_in_their_types(blueprint, pii_key):
    key = pii_key.encode()
    example = features_to_example(FEATURES, blueprint, key)
    parsed = _parse(
        example,
        {
            "tenure_days": tf.io.FixedLenFeature([], tf.int64),
            "hour_of_day": tf.io.FixedLenFeature([], tf.int64),
            "sends_last_7d": tf.io.FixedLenFeature([], tf.int64),
            "open_rate_30d": tf.io.FixedLenFeature([], tf.float32),
            "country": tf.io.FixedLenFeature([], tf.string),
            "platform": tf.io.FixedLenFeature([], tf.string),
            "user_id": tf.io.FixedLenFeature([], tf.string),
            "recent_clicks": tf.io.VarLenFeature(tf.float32),
            "topics": tf.io.VarLenFeature(tf.string),
        },
    )
    assert parsed["tenure_days"].numpy() == 120
    assert parsed["hour_of_day"].numpy() == 13
    assert parsed["sends_last_7d"].numpy() == 4
    assert parsed["open_rate_30d"].numpy() == pytest.approx(0.25)
    assert parsed["country"].numpy() == b"KR"
    assert parsed["platform"].numpy() == b"ios"
    assert list(parsed["recent_clicks"].values.numpy()) == [1.0, 0.0, 2.0]
    assert list(parsed["topics"].values.numpy()) == [b"sale", b"news"]
    assert set(example.features.feature) == {f.name for f in blueprint.example_features}


def test_pseudonymised_identifier_is_keyed_hmac_and_raw_value_never_present(blueprint, pii_key):
    key = pii_key.encode()
    serialized = features_to_example(FEATURES, blueprint, key).SerializeToString()
    expected = hmac.new(key, b"user-8841", hashlib.sha256).hexdigest()
    user_id = tf.train.Example.FromString(serialized).features.feature["user_id"]
    assert user_id.bytes_list.value == [expected.encode()]
    assert b"user-8841" not in serialized
    assert b"someone@example.com" not in serialized
    assert pseudonymise("user-8841", b"another-key") != expected


def test_dropped_feature_is_absent(blueprint, pii_key):
    example = features_to_example(FEATURES, blueprint, pii_key.encode())
    assert "email" not in example.features.feature


def test_missing_key_is_one_clear_error(blueprint, monkeypatch):
    monkeypatch.delenv("LOOPLINE_PII_KEY", raising=False)
    with pytest.raises(PiiKeyMissing, match="LOOPLINE_PII_KEY") as info:
        pii_key(blueprint)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    monkeypatch.setenv("LOOPLINE_PII_KEY", "")
    with pytest.raises(PiiKeyMissing):
        pii_key(blueprint)
    with pytest.raises(PiiKeyMissing):
        features_to_example(FEATURES, blueprint, None)


def test_no_key_needed_when_nothing_is_pseudonymised(monkeypatch):
    monkeypatch.delenv("LOOPLINE_PII_KEY", raising=False)
    plain = parse_blueprint(
        "name: plain\nversion: 2\nfeatures: [{name: n, type: int_list}, {name: s, type: string}]\n"
        "label: {name: y, observation: v, aggregation: mean, window: 1h, default: 0.5}\n"
    )
    assert pii_key(plain) is None
    example = features_to_example({"n": [], "s": "x"}, plain, None)
    parsed = _parse(
        example, {"n": tf.io.VarLenFeature(tf.int64), "s": tf.io.FixedLenFeature([], tf.string)}
    )
    assert parsed["n"].values.numpy().tolist() == []
    assert example.features.feature["n"].WhichOneof("kind") == "int64_list"
    # A float label is written as a float, whatever the python type of the joined label.
    decision = DecisionEvent("d-9", "plain", 5, {"n": [3, 4], "s": "x"})
    joined = joined_to_example(
        JoinedDecision(decision, 1, OBSERVED, 2, (1, 2), (1, 2)), plain, None
    )
    assert joined.features.feature["y"].float_list.value == [1.0]
    assert joined.features.feature["blueprint_version"].bytes_list.value == [b"2"]


def test_joined_example_holds_label_and_join_columns(blueprint, pii_key):
    decision = _decision(blueprint_version="7", model_id="notify-00017", propensity=0.8)
    example = joined_to_example(_joined(decision, label=1), blueprint, pii_key.encode())
    parsed = _parse(
        example,
        {
            "clicked": tf.io.FixedLenFeature([], tf.int64),
            "decision_id": tf.io.FixedLenFeature([], tf.string),
            "decision_time_ms": tf.io.FixedLenFeature([], tf.int64),
            "join_status": tf.io.FixedLenFeature([], tf.string),
            "blueprint_version": tf.io.FixedLenFeature([], tf.string),
            "model_id": tf.io.FixedLenFeature([], tf.string),
            "propensity": tf.io.FixedLenFeature([], tf.float32),
            "tenure_days": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    assert parsed["clicked"].numpy() == 1
    assert parsed["decision_id"].numpy() == b"d-123"
    assert parsed["decision_time_ms"].numpy() == 1_793_534_400_000
    assert parsed["join_status"].numpy() == b"observed"
    assert parsed["blueprint_version"].numpy() == b"7"
    assert parsed["model_id"].numpy() == b"notify-00017"
    assert parsed["propensity"].numpy() == pytest.approx(0.8)
    assert parsed["tenure_days"].numpy() == 120
    assert "email" not in example.features.feature
    assert b"user-8841" not in example.SerializeToString()


def test_joined_example_without_optionals_uses_blueprint_version(blueprint, pii_key):
    example = joined_to_example(
        _joined(_decision(), label=0, status=DEFAULT), blueprint, pii_key.encode()
    )
    feature = example.features.feature
    assert feature["blueprint_version"].bytes_list.value == [blueprint.version.encode()]
    assert feature["join_status"].bytes_list.value == [b"default"]
    assert feature["clicked"].int64_list.value == [0]


_PROVENANCE_SPEC = {
    "decision": tf.io.FixedLenFeature([], tf.int64),
    "propensity": tf.io.FixedLenFeature([], tf.float32),
    "arm": tf.io.FixedLenFeature([], tf.string),
    "model_id": tf.io.FixedLenFeature([], tf.string),
}


def test_joined_example_carries_decision_provenance_typed(blueprint, pii_key):
    decision = _decision(decision=1, model_id="notify-00017", propensity=0.8)
    example = joined_to_example(_joined(decision), blueprint, pii_key.encode())
    parsed = _parse(example, _PROVENANCE_SPEC)
    assert parsed["decision"].numpy() == 1
    assert parsed["propensity"].numpy() == pytest.approx(0.8)
    assert parsed["model_id"].numpy() == b"notify-00017"
    assert parsed["arm"].numpy() == b""


def test_absent_provenance_is_written_as_explicit_sentinels(blueprint, pii_key):
    example = joined_to_example(_joined(_decision()), blueprint, pii_key.encode())
    parsed = _parse(example, _PROVENANCE_SPEC)
    assert (parsed["decision"].numpy(), parsed["propensity"].numpy()) == (-1, -1.0)
    assert (parsed["arm"].numpy(), parsed["model_id"].numpy()) == (b"", b"")


def test_a_decision_that_is_not_an_integer_is_written_as_absent(blueprint, pii_key):
    for value in ("send", 1.5, 2**70):
        example = joined_to_example(_joined(_decision(decision=value)), blueprint, b"k")
        assert example.features.feature["decision"].int64_list.value == [-1]
    example = joined_to_example(_joined(_decision(decision=True)), blueprint, b"k")
    assert example.features.feature["decision"].int64_list.value == [1]


def test_missing_feature_names_it(blueprint, pii_key):
    features = dict(FEATURES)
    del features["country"]
    with pytest.raises(ValueError, match="country"):
        features_to_example(features, blueprint, pii_key.encode())


# Values of every kind a caller might pass, valid for the example blueprint or not.
_ANY_SCALAR = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, width=64),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.binary(max_size=3),
)
_ANY_VALUE = _ANY_SCALAR | st.lists(_ANY_SCALAR, max_size=3)


def _valid_rows(blueprint):
    """Rows the parser would accept: each feature of its declared type."""
    scalar = {
        "int": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
        "string": st.text(max_size=8),
    }
    return st.fixed_dictionaries({
        spec.name: st.lists(scalar[spec.base_type], max_size=4) if spec.is_list
        else scalar[spec.base_type]
        for spec in blueprint.example_features
    })  # fmt: skip


def _serialized_one_by_one(rows, blueprint, key):
    return [features_to_example(row, blueprint, key).SerializeToString() for row in rows]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_encoding_parses_to_the_per_row_examples(blueprint, data):
    key = b"batch-key"
    rows = data.draw(st.lists(_valid_rows(blueprint), min_size=1, max_size=5))
    batch = features_to_examples(rows, blueprint, key)
    assert [tf.train.Example.FromString(b) for b in batch] == [
        tf.train.Example.FromString(b) for b in _serialized_one_by_one(rows, blueprint, key)
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_encoding_never_differs_from_per_row_on_odd_values(blueprint, data):
    """Whatever the values, the batch either raises or gives what features_to_example gives;
    and a row that features_to_example refuses makes the batch raise."""
    key = b"batch-key"
    rows = data.draw(st.lists(_valid_rows(blueprint), min_size=1, max_size=3))
    row = data.draw(st.integers(0, len(rows) - 1))
    name = data.draw(st.sampled_from([spec.name for spec in blueprint.example_features]))
    rows[row] = {**rows[row], name: data.draw(_ANY_VALUE)}
    try:
        expected = _serialized_one_by_one(rows, blueprint, key)
    except Exception:  # noqa: BLE001 - any refusal of one row must refuse the batch
        with pytest.raises(Exception):  # noqa: B017
            features_to_examples(rows, blueprint, key)
        return
    try:
        batch = features_to_examples(rows, blueprint, key)
    except Exception:  # noqa: BLE001 - raising is allowed: callers fall back to one by one
        return
    assert [tf.train.Example.FromString(b) for b in batch] == [
        tf.train.Example.FromString(b) for b in expected
    ]


def test_batch_encoding_of_no_rows_and_without_a_key(blueprint):
    assert features_to_examples([], blueprint, None) == []
    with pytest.raises(PiiKeyMissing):
        features_to_examples([FEATURES], blueprint, None)


def test_batch_encoding_refuses_what_it_would_encode_differently(blueprint, pii_key):
    from collections import defaultdict

    key = pii_key.encode()

    class Hundred(int):
        def __int__(self):
            return 100

    # A row that only looks complete, a bool and an int subclass: each makes the batch raise,
    # so callers fall back to features_to_example row by row.
    lazy = defaultdict(list, {k: v for k, v in FEATURES.items() if k != "topics"})
    for row in (lazy, {**FEATURES, "hour_of_day": True}, {**FEATURES, "hour_of_day": Hundred(5)}):
        with pytest.raises((TypeError, ValueError)):
            features_to_examples([FEATURES, row], blueprint, key)


def _joined_decisions(blueprint):
    """JoinedDecisions the join can emit: valid features, any label, provenance or none."""
    decision = st.builds(
        DecisionEvent,
        decision_id=st.text(min_size=1, max_size=8),
        decision_type=st.just(blueprint.name),
        event_time_ms=st.integers(0, 2**50),
        features=_valid_rows(blueprint),
        blueprint_version=st.none() | st.text(max_size=4),
        decision=st.none() | st.integers(-(2**64), 2**64) | st.booleans() | st.text(max_size=3),
        model_id=st.none() | st.text(max_size=8),
        propensity=st.none() | st.floats(0, 1),
    )
    return st.builds(
        JoinedDecision,
        decision=decision,
        label=st.integers(0, 5),
        join_status=st.sampled_from([OBSERVED, DEFAULT]),
        observations_used=st.just(0),
        label_delays_ms=st.just(()),
        observation_offsets_ms=st.just(()),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_joined_batch_encoding_parses_to_the_per_row_examples(blueprint, data):
    key = b"batch-key"
    joined = data.draw(st.lists(_joined_decisions(blueprint), min_size=1, max_size=5))
    batch = joined_to_examples(joined, blueprint, key)
    assert [tf.train.Example.FromString(b) for b in batch] == [
        joined_to_example(j, blueprint, key) for j in joined
    ]


def test_joined_batch_encoding_writes_a_float_label_as_float():
    plain = parse_blueprint(
        "name: plain\nversion: 2\nfeatures: [{name: s, type: string}]\n"
        "label: {name: y, observation: v, aggregation: mean, window: 1h, default: 0.5}\n"
    )
    joined = JoinedDecision(DecisionEvent("d-1", "plain", 5, {"s": "x"}), 1, OBSERVED, 1, (), ())
    (encoded,) = joined_to_examples([joined], plain, None)
    assert tf.train.Example.FromString(encoded) == joined_to_example(joined, plain, None)
    assert tf.train.Example.FromString(encoded).features.feature["y"].float_list.value == [1.0]
