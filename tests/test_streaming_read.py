"""``transforms.streaming``: event time from the Pub/Sub attribute, bad times, late messages.

Messages are Create'd stamped with their publish time, as ``ReadFromPubSub`` stamps them
without ``timestamp_attribute``. (Against the real emulator: tests/test_join_pubsub_emulator.py.)
"""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from loopline.events import BAD_TIME, format_event_time
from loopline.privacy import PayloadPrivacy
from transforms.sources import ReadEvents
from transforms.streaming import LATE, assign_event_time, event_time_of

T0 = 1_793_534_400_000  # 2026-11-01T12:00:00Z
LATENESS = 60_000


def _published(at_ms: int, data: bytes, **attributes) -> TimestampedValue:
    return TimestampedValue(PubsubMessage(data, attributes), at_ms / 1000)


def _run(messages, check) -> None:
    with TestPipeline() as p:
        events = (
            p | beam.Create(messages) | assign_event_time("decision", allowed_lateness_ms=LATENESS)
        )
        check(events)


def _stamped(message, timestamp=beam.DoFn.TimestampParam):
    return message.data, timestamp.micros // 1000


def _refusals(pcoll):
    return pcoll | beam.Map(lambda r: (r.reason, r.source, r.payload))


def test_message_is_stamped_with_the_event_time_attribute_not_its_publish_time():
    message = _published(T0 + 5_000, b"a", event_time=format_event_time(T0))

    def check(events):
        assert_that(events.messages | beam.Map(_stamped), equal_to([(b"a", T0)]))

    _run([message], check)


def test_epoch_milliseconds_attribute_is_accepted():
    message = _published(T0, b"a", event_time=str(T0 - 1))
    _run(
        [message],
        lambda events: assert_that(
            events.messages | beam.Map(_stamped), equal_to([(b"a", T0 - 1)])
        ),
    )


@pytest.mark.parametrize(
    "attributes",
    [{}, {"event_time": "yesterday"}, {"event_time": "2026-11-01T12:00:00"}, {"event_time": "1.5"}],
    ids=["missing", "unparsable", "no-zone", "float"],
)
def test_missing_or_unparsable_attribute_is_rejected_as_bad_time(attributes):
    message = _published(T0, b'{"decision_id": "d1"}', **attributes)

    def check(events):
        assert_that(
            _refusals(events.rejected),
            equal_to([(BAD_TIME, "decision", '{"decision_id": "d1"}')]),
            label="Rejected",
        )
        assert_that(events.messages, equal_to([]), label="NoMessages")

    _run([message], check)


def test_message_published_later_than_the_allowed_lateness_is_late():
    backfill = _published(T0 + LATENESS + 1, b"old", event_time=format_event_time(T0))

    def check(events):
        assert_that(_refusals(events.late), equal_to([(LATE, "decision", "old")]), label="Late")
        assert_that(events.messages, equal_to([]), label="NoMessages")

    _run([backfill], check)


def test_message_published_exactly_the_allowed_lateness_after_its_event_is_on_time():
    message = _published(T0 + LATENESS, b"a", event_time=format_event_time(T0))
    _run(
        [message],
        lambda events: assert_that(events.messages | beam.Map(_stamped), equal_to([(b"a", T0)])),
    )


def test_event_time_of_names_the_missing_attribute():
    with pytest.raises(ValueError, match="no event_time attribute"):
        event_time_of({"decision_id": "d1"})


def test_pubsub_source_reads_attributes_and_leaves_the_timestamp_to_assign_event_time(
    monkeypatch,
):
    """Pub/Sub is faked at the client boundary: ``timestamp_attribute`` would fail the read on
    a bad attribute, so the source must not set it."""
    calls = []

    class Recording(beam.PTransform):
        def __init__(self, **kwargs):
            super().__init__()
            calls.append(kwargs)

        def expand(self, pbegin):
            return pbegin | beam.Create([])

    monkeypatch.setattr(beam.io, "ReadFromPubSub", Recording)
    _ = beam.Pipeline() | ReadEvents("decision", subscription="projects/loopline/subscriptions/d")
    assert calls == [{"subscription": "projects/loopline/subscriptions/d", "with_attributes": True}]


def test_refused_and_late_payloads_keep_no_private_value(blueprint):
    privacy = PayloadPrivacy.from_blueprint(blueprint, b"k")  # notify: user_id, email private
    payload = b'{"decision_id": "d1", "features": {"user_id": "u-1", "email": "a@example.com"}}'
    messages = [
        _published(T0, payload),  # no event_time attribute: bad_time
        _published(T0 + LATENESS + 1, payload, event_time=format_event_time(T0)),  # late
    ]
    raw_values = ("u-1", "a@example.com")

    def private_values(refusal) -> list[str]:
        text = json.dumps(refusal.to_dict())
        return [refusal.reason, *(value for value in raw_values if value in text)]

    with TestPipeline() as p:
        events = (
            p
            | beam.Create(messages)
            | assign_event_time("decision", allowed_lateness_ms=LATENESS, privacy=privacy)
        )
        assert_that(events.rejected | beam.Map(private_values), equal_to([[BAD_TIME]]), "Rejected")
        assert_that(events.late | "Late" >> beam.Map(private_values), equal_to([[LATE]]), "Late")
