"""ParseDecisions / ParseObservations: every input format, dead letters, event-time stamps."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from loopline import avro
from loopline.events import (
    BAD_JSON,
    BAD_TIME,
    DECISION,
    FEATURE_TYPE,
    LABEL_TYPE,
    MISSING_FIELD,
    OBSERVATION,
    DeadLetter,
)
from loopline.privacy import PayloadPrivacy, digest, pseudonymise
from tests.test_join import FEATURES, MINUTE, T0, decision, observation
from transforms.events import INTERNAL_ERROR, ParseDecisions, ParseObservations, parse_one, redact

DECISION_LINE = json.dumps(decision("d1", at=T0, model_id="notify-1", propensity=0.8).to_dict())
OBSERVATION_LINE = json.dumps(observation("d1", at=T0 + MINUTE, click=1).to_dict())
BAD_FEATURE_LINE = json.dumps(
    {**json.loads(DECISION_LINE), "features": {**FEATURES, "tenure_days": "old"}}
)


class ExplodingRecord(dict):
    """A record whose accessors fail: stands in for any unexpected error inside parsing."""

    def get(self, key, default=None):
        raise RuntimeError("storage went away")


def counters(result):
    query = result.metrics().query(MetricsFilter().with_namespace("loopline.parse"))["counters"]
    return {c.key.metric.name: c.committed for c in query}


def run_parse(raw, transform, expected_events, expected_reasons):
    """Parses ``raw`` in a pipeline and checks events (with event-time stamps) and refusals."""
    pipeline = test_pipeline.TestPipeline()
    parsed = pipeline | beam.Create(raw, reshuffle=False) | "Parse" >> transform
    assert_that(
        parsed.events
        | "WithTimestamp" >> beam.Map(lambda e, t=beam.DoFn.TimestampParam: (e, t.micros // 1000)),
        equal_to([(e, e.event_time_ms) for e in expected_events]),
        label="Events",
    )
    assert_that(
        parsed.rejected | "Reasons" >> beam.Map(lambda r: (r.reason, r.source, bool(r.payload))),
        equal_to(expected_reasons),
        label="Rejected",
    )
    result = pipeline.run()
    result.wait_until_finish()
    return result


def test_json_lines_become_events_stamped_with_event_time_and_bad_lines_dead_letters(blueprint):
    lines = [
        DECISION_LINE,
        DECISION_LINE.encode(),
        "{not json",
        BAD_FEATURE_LINE,
        '{"decision_id": "d2"}',
    ]
    result = run_parse(
        lines,
        ParseDecisions(blueprint),
        [decision("d1", at=T0, model_id="notify-1", propensity=0.8)] * 2,
        [
            (BAD_JSON, DECISION, True),
            (FEATURE_TYPE, DECISION, True),
            (MISSING_FIELD, DECISION, True),
        ],
    )
    assert counters(result) == {
        "decisions_parsed": 2,
        "decisions_rejected": 3,
        "decisions_rejected_bad_json": 1,
        "decisions_rejected_feature_type": 1,
        "decisions_rejected_missing_field": 1,
    }


def test_observation_with_non_numeric_label_value_is_refused(blueprint):
    bad_label = json.dumps({**json.loads(OBSERVATION_LINE), "observations": {"click": "yes"}})
    bad_time = json.dumps({**json.loads(OBSERVATION_LINE), "event_time": "2026-11-01 12:00"})
    run_parse(
        [OBSERVATION_LINE, bad_label, bad_time],
        ParseObservations(blueprint),
        [observation("d1", at=T0 + MINUTE, click=1)],
        [(LABEL_TYPE, OBSERVATION, True), (BAD_TIME, OBSERVATION, True)],
    )


def test_avro_files_read_by_beam_parse_like_their_json_twins(blueprint, tmp_path):
    events = [decision("d1", at=T0, model_id="notify-1", propensity=0.8), decision("d2", at=T0 + 1)]
    with open(tmp_path / "decisions.avro", "wb") as f:
        avro.write_events(f, DECISION, events)
    pipeline = test_pipeline.TestPipeline()
    parsed = (
        pipeline
        | beam.io.ReadFromAvro(str(tmp_path / "decisions.avro"))
        | "Parse" >> ParseDecisions(blueprint, format="avro")
    )
    assert_that(
        parsed.events | beam.Map(lambda e, t=beam.DoFn.TimestampParam: (e, t.micros // 1000)),
        equal_to([(e, e.event_time_ms) for e in events]),
    )
    assert_that(parsed.rejected, equal_to([]), label="NothingRejected")
    pipeline.run().wait_until_finish()


def test_avro_record_that_is_not_a_record_is_refused(blueprint):
    run_parse(
        [avro.to_record(observation("d1", at=T0)), "not a record"],
        ParseObservations(blueprint, format="avro"),
        [observation("d1", at=T0)],
        [("bad_avro", OBSERVATION, True)],
    )


def test_bigquery_rows_parse_as_records(blueprint):
    """BigQuery is a cloud service: its rows are given here as the dicts ReadFromBigQuery yields."""
    row = {**json.loads(DECISION_LINE), "event_time": T0}
    timestamp_column = {
        **row,
        "decision_id": "d2",
        "event_time": datetime(2026, 11, 1, 12, tzinfo=timezone.utc),
    }
    wrong_type = {**row, "decision_id": 17}
    run_parse(
        [row, timestamp_column, wrong_type],
        ParseDecisions(blueprint, format="record"),
        [decision(i, at=T0, model_id="notify-1", propensity=0.8) for i in ("d1", "d2")],
        [("wrong_type", DECISION, True)],
    )


def test_pubsub_messages_parse_their_json_payload(blueprint):
    """Pub/Sub is a cloud service: its messages are built here as ReadFromPubSub would yield them."""
    messages = [
        PubsubMessage(OBSERVATION_LINE.encode(), {"event_time": "2026-11-01T12:01:00Z"}),
        PubsubMessage(b"\xff\xfe not json", {}),
        OBSERVATION_LINE.encode(),  # ReadFromPubSub without attributes yields the bytes
    ]
    run_parse(
        messages,
        ParseObservations(blueprint, format="pubsub"),
        [observation("d1", at=T0 + MINUTE, click=1)] * 2,
        [(BAD_JSON, OBSERVATION, True)],
    )


def test_unexpected_error_is_refused_as_internal_error_not_raised(blueprint):
    refusal = parse_one(ExplodingRecord(decision_id="d1"), DECISION, "record", blueprint)
    assert isinstance(refusal, DeadLetter)
    assert (refusal.reason, refusal.source) == (INTERNAL_ERROR, DECISION)
    assert refusal.detail == "RuntimeError: storage went away"
    assert json.loads(refusal.payload) == {"decision_id": "d1"}
    result = run_parse(
        [ExplodingRecord(decision_id="d1"), json.loads(DECISION_LINE)],
        ParseDecisions(blueprint, format="record"),
        [decision("d1", at=T0, model_id="notify-1", propensity=0.8)],
        [(INTERNAL_ERROR, DECISION, True)],
    )
    assert counters(result)["decisions_rejected_internal_error"] == 1


def test_json_format_refuses_a_non_text_input(blueprint):
    refusal = parse_one({"decision_id": "d1"}, DECISION, "json", blueprint)
    assert refusal.reason == BAD_JSON and "expected a JSON line, got dict" in refusal.detail


def test_unknown_format_fails_at_construction(blueprint):
    with pytest.raises(ValueError, match="format must be one of json, avro, record, pubsub"):
        ParseDecisions(blueprint, format="csv")


# --- Privacy: refused payloads redacted where they are made; raw bytes only in quarantine ----

KEY = b"test-key-not-a-secret"
CUT_LINE = DECISION_LINE[: DECISION_LINE.index("a@example.com") + 14]  # not JSON, holds PII
NOT_UTF8_LINE = DECISION_LINE.encode().replace(b'"d1"', b'"d1\xff"')
PRIVACY_INPUTS = [DECISION_LINE, CUT_LINE, BAD_FEATURE_LINE, NOT_UTF8_LINE]


def parse_privately(blueprint, raw, privacy, out_dir, fmt="json"):
    """The refusals (as written: dicts) and quarantined payloads (as JSON lines, read back as
    dicts) of parsing ``raw`` with ``privacy``."""
    with test_pipeline.TestPipeline() as pipeline:
        parsed = (
            pipeline
            | beam.Create(raw, reshuffle=False)
            | ParseDecisions(blueprint, format=fmt, privacy=privacy)
        )
        _ = (
            parsed.rejected
            | "RejectedJson" >> beam.Map(lambda r: json.dumps(r.to_dict()))
            | "WriteRejected" >> beam.io.WriteToText(str(out_dir / "rejected"))
        )
        _ = (
            parsed.quarantined
            | "QuarantinedJson" >> beam.Map(lambda q: q.to_json())
            | "WriteQuarantined" >> beam.io.WriteToText(str(out_dir / "quarantined"))
        )

    def read(prefix):
        return [json.loads(line) for f in out_dir.glob(f"{prefix}*") for line in f.open()]

    return read("rejected"), read("quarantined")


def test_with_privacy_a_refused_json_object_keeps_its_shape_redacted(blueprint, tmp_path):
    refusals, quarantined = parse_privately(
        blueprint,
        [DECISION_LINE, BAD_FEATURE_LINE],
        PayloadPrivacy.from_blueprint(blueprint, KEY),
        tmp_path,
    )
    (refusal,) = refusals
    expected = json.loads(BAD_FEATURE_LINE)
    expected["features"]["user_id"] = pseudonymise("u-1", KEY)
    del expected["features"]["email"]
    assert (refusal["reason"], refusal["payload"]) == (FEATURE_TYPE, expected)
    assert quarantined == []


def test_with_privacy_a_payload_that_does_not_parse_is_only_its_digest(blueprint, tmp_path):
    refusals, _ = parse_privately(
        blueprint,
        [CUT_LINE, NOT_UTF8_LINE],
        PayloadPrivacy.from_blueprint(blueprint, KEY),
        tmp_path,
    )
    assert sorted((r["reason"], json.dumps(r["payload"])) for r in refusals) == sorted(
        (BAD_JSON, json.dumps(digest(raw))) for raw in (CUT_LINE, NOT_UTF8_LINE)
    )


def test_with_quarantine_the_raw_payloads_leave_on_their_own_output_only(blueprint, tmp_path):
    privacy = PayloadPrivacy.from_blueprint(blueprint, KEY, quarantine=True)
    refusals, quarantined = parse_privately(blueprint, PRIVACY_INPUTS, privacy, tmp_path)
    raw_refused = [r if isinstance(r, bytes) else r.encode() for r in PRIVACY_INPUTS[1:]]
    assert sorted(q["sha256"] for q in quarantined) == sorted(
        hashlib.sha256(raw).hexdigest() for raw in raw_refused
    )
    assert {q["reason"] for q in quarantined} == {BAD_JSON, FEATURE_TYPE}
    assert sum("a@example.com" in q.get("payload", "") for q in quarantined) == 2
    assert not any("a@example.com" in json.dumps(r) for r in refusals)


def test_with_privacy_record_and_pubsub_payloads_are_redacted_too(blueprint, tmp_path):
    privacy = PayloadPrivacy.from_blueprint(blueprint, KEY)
    (record_refusal,), _ = parse_privately(
        blueprint, [json.loads(BAD_FEATURE_LINE)], privacy, tmp_path / "record", "record"
    )
    (message_refusal,), _ = parse_privately(
        blueprint, [PubsubMessage(CUT_LINE.encode(), {})], privacy, tmp_path / "pubsub", "pubsub"
    )
    assert record_refusal["payload"]["features"]["user_id"] == pseudonymise("u-1", KEY)
    assert "email" not in record_refusal["payload"]["features"]
    assert message_refusal["payload"] == digest(CUT_LINE)


def test_with_privacy_an_internal_error_keeps_only_the_exception_type(blueprint):
    refusal = parse_one(ExplodingRecord(email="a@example.com"), DECISION, "record", blueprint)
    redacted = redact(
        refusal,
        ExplodingRecord(email="a@example.com"),
        PayloadPrivacy.from_blueprint(blueprint, KEY),
    )
    assert redacted.detail == "RuntimeError" and redacted.payload == {}


def test_when_redaction_itself_fails_only_the_digest_is_kept(blueprint):
    class BrokenPrivacy(PayloadPrivacy):
        def redact(self, raw):
            raise RuntimeError(f"cannot redact {raw!r}")

    refusal = parse_one(BAD_FEATURE_LINE, DECISION, "json", blueprint)
    redacted = redact(refusal, BAD_FEATURE_LINE, BrokenPrivacy())
    assert redacted.payload == digest(BAD_FEATURE_LINE)
