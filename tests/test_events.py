"""Event parsing: every input becomes an event or a refusal with a specific reason, never a crash."""

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline import avro, events
from loopline.events import (
    DeadLetter,
    DecisionEvent,
    ObservationEvent,
    format_event_time,
    parse_decision_json,
    parse_event_time,
    parse_observation_json,
)

T0 = "2026-11-01T12:00:00Z"


def good_features():
    return {
        "user_id": "u-1",
        "tenure_days": 120,
        "country": "KR",
        "platform": "ios",
        "hour_of_day": 12,
        "sends_last_7d": 3,
        "open_rate_30d": 0.25,
        "recent_clicks": [1.0, 0, 2],
        "topics": ["sports"],
        "email": "a@example.com",
        "click_rate_90d": 0.12,
        "favourite_topic": "sports",
        "favourite_topic_match": 1,
    }


def decision_line(**overrides):
    obj = {
        "decision_id": "d-1",
        "decision_type": "notify",
        "blueprint_version": "1",
        "event_time": T0,
        "features": good_features(),
        "decision": 1,
        "model_id": "notify-17",
        "propensity": 0.8,
    }
    obj.update(overrides)
    return json.dumps(obj)


def test_event_time_accepts_rfc3339_with_zone_and_epoch_millis():
    ms = parse_event_time(T0)
    assert format_event_time(ms) == "2026-11-01T12:00:00.000Z"
    assert parse_event_time(ms) == ms
    assert parse_event_time("2026-11-01T21:00:00+09:00") == ms
    assert parse_event_time("2026-11-01T12:00:00.250Z") == ms + 250
    assert parse_event_time("2026-11-01T12:00:00.2509999Z") == ms + 250  # truncates beyond millis
    assert parse_event_time("2026-11-01t12:00:00z") == ms


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-01T12:00:00",
        "2026-11-01",
        "yesterday",
        1.5e12,
        True,
        None,
        [],
        -1,
        "2026-13-01T12:00:00Z",
        "2026-11-01T12:00:00.Z",
        10**15,
    ],
)
def test_event_time_refuses_anything_else(value):
    with pytest.raises(ValueError, match="event_time"):
        parse_event_time(value)


def test_valid_decision_parses_with_optionals(blueprint):
    event = parse_decision_json(decision_line(), blueprint)
    assert isinstance(event, DecisionEvent)
    assert event.event_time_ms == parse_event_time(T0)
    assert event.features["recent_clicks"] == [1.0, 0, 2]
    assert (event.decision, event.model_id, event.propensity, event.blueprint_version) == (
        1,
        "notify-17",
        0.8,
        "1",
    )


def test_decision_round_trips_through_json(blueprint):
    event = parse_decision_json(decision_line(), blueprint)
    assert parse_decision_json(event.to_json(), blueprint) == event


@pytest.mark.parametrize(
    "line, reason, detail",
    [
        ("{not json", events.BAD_JSON, "not valid JSON"),
        ("[1, 2]", events.NOT_AN_OBJECT, "JSON object"),
        (decision_line(decision_id=None), events.MISSING_FIELD, "'decision_id'"),
        (decision_line(decision_id=7), events.WRONG_TYPE, "'decision_id' must be a string"),
        (decision_line(event_time="noon"), events.BAD_TIME, "RFC 3339"),
        (decision_line(event_time="2026-11-01T12:00:00"), events.BAD_TIME, "no zone"),
        (decision_line(features=[1]), events.WRONG_TYPE, "'features' must be an object"),
        (decision_line(features=None), events.MISSING_FIELD, "'features'"),
        (decision_line(propensity=1.5), events.WRONG_TYPE, "propensity"),
        (decision_line(decision_type="rank"), events.WRONG_DECISION_TYPE, "'rank'"),
        (decision_line(features={**good_features(), "age": 3}), events.UNKNOWN_FEATURE, "'age'"),
        (
            decision_line(features={k: v for k, v in good_features().items() if k != "country"}),
            events.MISSING_FEATURE,
            "'country'",
        ),
        (
            decision_line(features={**good_features(), "tenure_days": "120"}),
            events.FEATURE_TYPE,
            "must be int",
        ),
        (
            decision_line(features={**good_features(), "tenure_days": 1.5}),
            events.FEATURE_TYPE,
            "must be int",
        ),
        (
            decision_line(features={**good_features(), "tenure_days": True}),
            events.FEATURE_TYPE,
            "must be int",
        ),
        (
            decision_line(features={**good_features(), "recent_clicks": [1, "x"]}),
            events.FEATURE_TYPE,
            "float_list",
        ),
        (
            decision_line(features={**good_features(), "topics": "sports"}),
            events.FEATURE_TYPE,
            "string_list",
        ),
    ],
)
def test_bad_decisions_are_refused_with_a_specific_reason(blueprint, line, reason, detail):
    result = parse_decision_json(line, blueprint)
    assert isinstance(result, DeadLetter)
    assert (result.reason, result.source, result.payload) == (reason, "decision", line)
    assert detail in result.detail


def test_observation_parses_and_label_source_must_be_numeric(blueprint):
    line = json.dumps(
        {
            "decision_id": "d-1",
            "event_time": 1_700_000_000_000,
            "observations": {"click": 1, "dwell_seconds": 12.5},
        }
    )
    event = parse_observation_json(line, blueprint)
    assert event == ObservationEvent("d-1", 1_700_000_000_000, {"click": 1, "dwell_seconds": 12.5})
    refused = parse_observation_json(line.replace('"click": 1', '"click": "yes"'), blueprint)
    assert isinstance(refused, DeadLetter) and refused.reason == events.LABEL_TYPE
    # Without a blueprint the label source is not known, so the value is not judged.
    assert isinstance(
        parse_observation_json(line.replace('"click": 1', '"click": "yes"')), ObservationEvent
    )


def test_bytes_payloads_are_decoded_and_kept(blueprint):
    result = parse_observation_json(b"\xff\xfe not json")
    assert isinstance(result, DeadLetter) and result.reason == events.BAD_JSON
    assert result.source == "observation" and "not json" in result.payload
    # Valid JSON in bytes that are not UTF-8: refused, not parsed with replacement characters.
    line = decision_line().replace('"decision_id": "', '"decision_id": "\udcff', 1)
    mangled = parse_decision_json(line.encode("utf-8", "surrogateescape"), blueprint)
    assert isinstance(mangled, DeadLetter) and mangled.reason == events.BAD_JSON
    assert "not valid UTF-8" in mangled.detail and "\ufffd" in mangled.payload
    assert isinstance(parse_decision_json(decision_line().encode(), blueprint), DecisionEvent)


def test_avro_round_trip_equals_json_parsing(blueprint):
    decision = parse_decision_json(decision_line(), blueprint)
    observation = ObservationEvent(
        "d-1", decision.event_time_ms + 5_000, {"click": True, "dwell_seconds": 3.5}
    )
    for kind, event in (("decision", decision), ("observation", observation)):
        buf = io.BytesIO()
        assert avro.write_events(buf, kind, [event]) == 1
        buf.seek(0)
        (back,) = list(avro.read_events(buf, kind, blueprint))
        assert back == event


def test_avro_record_failing_validation_is_refused(blueprint):
    record = avro.to_record(parse_decision_json(decision_line(), blueprint))
    record["features"] = {"tenure_days": 1}
    result = avro.from_record(record, "decision", blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.MISSING_FEATURE
    assert json.loads(result.payload)["features"] == {"tenure_days": 1}
    assert avro.from_record([1], "decision").reason == events.BAD_AVRO


# --- Property tests: random and mutated inputs never crash, always event-or-reason ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


def _assert_event_or_reason(result, kind):
    if isinstance(result, DeadLetter):
        assert result.reason in events.REASONS
        assert result.source == kind and result.detail
    else:
        assert isinstance(result, DecisionEvent if kind == "decision" else ObservationEvent)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_text_never_crashes_the_parsers(blueprint, payload):
    _assert_event_or_reason(parse_decision_json(payload, blueprint), "decision")
    _assert_event_or_reason(parse_observation_json(payload, blueprint), "observation")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(
        [
            "decision_id",
            "decision_type",
            "event_time",
            "features",
            "propensity",
            "blueprint_version",
            "model_id",
        ]
    ),
    json_values,
    st.booleans(),
)
def test_mutated_decisions_yield_event_or_reason(blueprint, field, value, delete):
    obj = json.loads(decision_line())
    if delete:
        obj.pop(field)
    else:
        obj[field] = value
    _assert_event_or_reason(parse_decision_json(json.dumps(obj), blueprint), "decision")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(good_features())), json_values)
def test_mutated_features_yield_event_or_feature_refusal(blueprint, name, value):
    features = {**good_features(), name: value}
    result = parse_decision_json(decision_line(features=features), blueprint)
    _assert_event_or_reason(result, "decision")
    if isinstance(result, DeadLetter):
        assert result.reason in (events.FEATURE_TYPE, events.MISSING_FEATURE)


@settings(max_examples=200)
@given(st.integers(min_value=events.MIN_EVENT_TIME_MS, max_value=events.MAX_EVENT_TIME_MS - 1))
def test_event_time_round_trips_through_rfc3339(ms):
    assert parse_event_time(format_event_time(ms)) == ms


# --- Bad bytes and values: refused with a reason, never passed on to crash a later step ------

T0_MS = 1_793_534_400_000  # 2026-11-01T12:00:00Z


@pytest.mark.parametrize(
    "value, hint",
    [
        (T0_MS // 1000, "epoch seconds"),
        (T0_MS * 1000, "epoch microseconds"),
        (events.MIN_EVENT_TIME_MS - 1, "2000-01-01..2100-01-01"),
        (events.MAX_EVENT_TIME_MS, "2000-01-01..2100-01-01"),
        ("1999-12-31T23:59:59.999Z", "2000-01-01..2100-01-01"),
        ("2100-01-01T00:00:00Z", "2000-01-01..2100-01-01"),
    ],
)
def test_event_time_outside_2000_to_2100_is_bad_time_with_a_unit_hint(blueprint, value, hint):
    result = parse_decision_json(decision_line(event_time=value), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.BAD_TIME
    assert hint in result.detail


def test_event_time_range_bounds_are_accepted():
    assert parse_event_time(events.MIN_EVENT_TIME_MS) == events.MIN_EVENT_TIME_MS
    assert parse_event_time("2000-01-01T00:00:00Z") == events.MIN_EVENT_TIME_MS
    assert parse_event_time(events.MAX_EVENT_TIME_MS - 1) == events.MAX_EVENT_TIME_MS - 1


@pytest.mark.parametrize(
    "name, value, detail",
    [
        ("tenure_days", 2**63, "int64"),
        ("tenure_days", -(2**63) - 1, "int64"),
        ("tenure_days", 2**70, "int64"),
        ("tenure_days", 10**400, "int64"),
        ("open_rate_30d", 1e308, "float32"),
        ("open_rate_30d", 10**39, "float32"),
        ("open_rate_30d", 10**400, "float32"),
        ("open_rate_30d", float("inf"), "float32"),
        ("open_rate_30d", float("nan"), "float32"),
        ("recent_clicks", [1.0, 1e39], "float32"),
        ("country", "K\udcff", "lone surrogate"),
        ("topics", ["ok", "\ud800"], "lone surrogate"),
    ],
)
def test_feature_values_a_tf_example_cannot_hold_are_feature_type(blueprint, name, value, detail):
    result = parse_decision_json(
        decision_line(features={**good_features(), name: value}), blueprint
    )
    assert isinstance(result, DeadLetter) and result.reason == events.FEATURE_TYPE
    assert name in result.detail and detail in result.detail


def test_feature_values_at_the_int64_and_float32_bounds_are_accepted(blueprint):
    for name, value in [
        ("tenure_days", 2**63 - 1),
        ("tenure_days", -(2**63)),
        ("open_rate_30d", events.FLOAT32_MAX),
        ("open_rate_30d", 2**100),
    ]:
        line = decision_line(features={**good_features(), name: value})
        assert isinstance(parse_decision_json(line, blueprint), DecisionEvent), (name, value)


@settings(max_examples=300)
@given(st.integers() | st.floats())
def test_an_int_feature_is_accepted_exactly_when_int64_holds_it(blueprint, value):
    result = parse_decision_json(
        decision_line(features={**good_features(), "tenure_days": value}), blueprint
    )
    fits = isinstance(value, int) and -(2**63) <= value < 2**63
    assert isinstance(result, DecisionEvent) == fits
    if not fits:
        assert result.reason == events.FEATURE_TYPE


@settings(max_examples=300)
@given(st.integers() | st.floats())
def test_a_float_feature_is_accepted_exactly_when_float32_holds_it(blueprint, value):
    result = parse_decision_json(
        decision_line(features={**good_features(), "open_rate_30d": value}), blueprint
    )
    fits = value == value and abs(value) <= 3.4028234663852886e38
    assert isinstance(result, DecisionEvent) == fits
    if not fits:
        assert result.reason == events.FEATURE_TYPE


@pytest.mark.parametrize("value", [10**400, 2**70, float("nan"), float("inf"), -0.5])
def test_propensity_must_be_a_number_in_0_1(blueprint, value):
    result = parse_decision_json(decision_line(propensity=value), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.WRONG_TYPE
    assert "propensity" in result.detail


def observation_line(click):
    return json.dumps({"decision_id": "d-1", "event_time": T0_MS, "observations": {"click": click}})


@pytest.mark.parametrize(
    "click, detail",
    [
        (2**63, "int64"),
        (2**70, "int64"),
        (1e23, "int64"),
        (float("nan"), "int64"),
        (float("inf"), "int64"),
        (10**400, "int64"),
    ],
)
def test_label_values_beyond_the_int_label_column_are_label_type(blueprint, click, detail):
    assert blueprint.label.type == "int"
    result = parse_observation_json(observation_line(click), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.LABEL_TYPE
    assert detail in result.detail


def test_label_values_beyond_float32_are_label_type_for_a_float_label(blueprint):
    import dataclasses

    float_label = dataclasses.replace(
        blueprint, label=dataclasses.replace(blueprint.label, type="float")
    )
    result = parse_observation_json(observation_line(1e308), float_label)
    assert isinstance(result, DeadLetter) and "float32" in result.detail
    assert isinstance(
        parse_observation_json(observation_line(2**63), float_label), ObservationEvent
    )


def test_label_values_within_int64_and_bools_are_accepted(blueprint):
    for click in (2**63 - 1, -(2**63), True, 0.5):
        assert isinstance(
            parse_observation_json(observation_line(click), blueprint), ObservationEvent
        )


def test_a_byte_order_mark_at_the_start_of_a_line_is_skipped(blueprint):
    line = decision_line()
    event = parse_decision_json(line, blueprint)
    assert parse_decision_json(b"\xef\xbb\xbf" + line.encode(), blueprint) == event
    assert parse_decision_json("\ufeff" + line, blueprint) == event
    observation = observation_line(1)
    assert isinstance(
        parse_observation_json(b"\xef\xbb\xbf" + observation.encode()), ObservationEvent
    )


def test_a_byte_order_mark_elsewhere_is_bad_json(blueprint):
    result = parse_decision_json(" \ufeff" + decision_line(), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.BAD_JSON


@pytest.mark.parametrize("field", ["decision_id", "decision_type", "model_id"])
def test_an_id_with_a_lone_surrogate_is_wrong_type(blueprint, field):
    result = parse_decision_json(decision_line(**{field: "d-\udcff"}), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.WRONG_TYPE


@pytest.mark.parametrize("name, value", [("user_id", 4242424242), ("email", ["a@example.com"])])
def test_a_refusal_detail_never_shows_a_private_feature_value(blueprint, name, value):
    result = parse_decision_json(
        decision_line(features={**good_features(), name: value}), blueprint
    )
    assert isinstance(result, DeadLetter) and result.reason == events.FEATURE_TYPE
    assert str(value).strip("[]'") not in result.detail and name in result.detail


def test_a_refusal_detail_describes_containers_by_type_and_size_only(blueprint):
    result = parse_decision_json(json.dumps([{"email": "a@example.com"}]), blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.NOT_AN_OBJECT
    assert "list of 1 item" in result.detail and "example.com" not in result.detail


def test_json_nested_deeper_than_the_limit_is_bad_json(blueprint):
    deep = "[" * 500 + "]" * 500
    line = observation_line(1).replace('"observations": {', '"observations": {"x": ' + deep + ", ")
    result = parse_observation_json(line, blueprint)
    assert isinstance(result, DeadLetter) and result.reason == events.BAD_JSON
    assert "nested deeper than 32" in result.detail


def test_json_with_many_brackets_but_shallow_nesting_is_accepted(blueprint):
    wide = json.dumps([{"a": [1]} for _ in range(100)])
    line = observation_line(1).replace('"observations": {', '"observations": {"x": ' + wide + ", ")
    assert isinstance(parse_observation_json(line, blueprint), ObservationEvent)


# ---------------------------------------------------------------------------------------------
# score and arm (a model's output, and the rollout arm that served the decision)


def test_score_and_arm_are_parsed_and_written_back(blueprint):
    event = parse_decision_json(decision_line(score=0.42, arm="challenger"), blueprint)
    assert (event.score, event.arm) == (0.42, "challenger")
    assert event.to_dict()["score"] == 0.42 and event.to_dict()["arm"] == "challenger"


def test_an_integer_score_is_read_as_a_float(blueprint):
    event = parse_decision_json(decision_line(score=1), blueprint)
    assert event.score == 1.0 and isinstance(event.score, float)


def test_an_event_without_score_or_arm_omits_them_in_its_json(blueprint):
    event = parse_decision_json(decision_line(), blueprint)
    assert (event.score, event.arm) == (None, None)
    assert "score" not in event.to_dict() and "arm" not in event.to_dict()


@pytest.mark.parametrize("score", ["0.4", True, [0.4], {"p": 0.4}, 10**400])
def test_a_score_that_is_not_a_finite_number_is_wrong_type(blueprint, score):
    refusal = parse_decision_json(decision_line(score=score), blueprint)
    assert isinstance(refusal, DeadLetter) and refusal.reason == events.WRONG_TYPE
    assert "'score'" in refusal.detail


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_score_is_wrong_type(blueprint, text):
    line = decision_line(score="PLACEHOLDER").replace('"PLACEHOLDER"', text)
    refusal = parse_decision_json(line, blueprint)
    assert isinstance(refusal, DeadLetter) and refusal.reason == events.WRONG_TYPE


@pytest.mark.parametrize("arm", ["", 1, True, ["challenger"], "\udcff"])
def test_an_arm_that_is_not_a_non_empty_string_is_wrong_type(blueprint, arm):
    refusal = decision_from_record_of(decision_line(), arm=arm, blueprint=blueprint)
    assert isinstance(refusal, DeadLetter) and refusal.reason == events.WRONG_TYPE
    assert "'arm'" in refusal.detail


def decision_from_record_of(line, blueprint, **overrides):
    return events.decision_from_record({**json.loads(line), **overrides}, blueprint)


def test_avro_round_trip_keeps_score_and_arm(blueprint):
    decision = parse_decision_json(decision_line(score=0.125, arm="production"), blueprint)
    buf = io.BytesIO()
    avro.write_events(buf, "decision", [decision])
    buf.seek(0)
    (back,) = list(avro.read_events(buf, "decision", blueprint))
    assert back == decision and (back.score, back.arm) == (0.125, "production")
