"""Reading events from Pub/Sub: event time from an attribute, bad times and late events counted.

``ReadFromPubSub`` can stamp elements from an attribute itself (``timestamp_attribute``), but
a value that does not parse then fails the read: the message is never acked and comes back
forever, and nothing reaches ``rejected/``. So the messages are read with their attributes and
no ``timestamp_attribute`` (each element is stamped with its publish time), and
``AssignEventTime`` stamps them here:

* a missing or unparsable ``event_time`` attribute sends the message to ``rejected`` with
  reason ``bad_time`` (a ``loopline.events.DeadLetter``, like the parse steps' dead letters);
* a message published more than the allowed lateness after its event time (a backfill
  through Pub/Sub, a producer that buffered for hours) goes to ``late`` with reason ``late``:
  the join could only report it beyond the horizon, or not at all once its session is gone;
* every other message goes on stamped with its event time.

With ``privacy`` (a ``loopline.privacy.PayloadPrivacy``), the payload of a refused or late
message is redacted as the parse steps redact theirs (``transforms.events.redact``): no raw
value the blueprint keeps private reaches ``rejected/`` or ``late/``.

Lateness is measured at the source, from the publish time, which is what the read's watermark
is made of: a message held back in the subscription (a job restarted after an hour) is not
late, a message published late is, on every runner and however far the watermark has got.
A redelivered message keeps its publish time, so redelivery never makes an event late; the
join's state catches the repeat (``transforms.join``).

    >>> raw = p | "ReadDecisions" >> ReadEvents(DECISION, subscription="projects/p/subscriptions/d")
    >>> events = raw | "AssignEventTime" >> assign_event_time(DECISION, allowed_lateness_ms=600_000)
    >>> events.messages   # PubsubMessage, timestamped by event time
    >>> events.rejected   # DeadLetter(reason="bad_time")
    >>> events.late       # DeadLetter(reason="late")
"""

from __future__ import annotations

from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.events import (
    BAD_TIME,
    DECISION,
    OBSERVATION,
    DeadLetter,
    format_event_time,
    parse_event_time,
)
from loopline.privacy import PayloadPrivacy
from loopline.vocabulary import Reason
from transforms.events import redact
from transforms.sources import EVENT_TIME_ATTRIBUTE

LATE = Reason.LATE
METRICS_NAMESPACE = "loopline.pubsub"
STEP = "AssignEventTime"  # as its dead letters name it

_MESSAGES = "messages"
_REJECTED = "rejected"
_LATE = "late"


class PubSubEvents(NamedTuple):
    """The three outputs of ``assign_event_time``."""

    messages: Any  # PCollection[PubsubMessage], timestamped by event time
    rejected: Any  # PCollection[DeadLetter]: bad_time
    late: Any  # PCollection[DeadLetter]: late


def event_time_of(attributes: Any, attribute: str = EVENT_TIME_ATTRIBUTE) -> int:
    """The event time (epoch ms) in a message's attributes; ValueError with a sentence if the
    attribute is missing or is not RFC 3339 with a zone nor integer epoch milliseconds.

    >>> event_time_of({"event_time": "2026-11-01T12:00:00Z"})
    1793534400000
    """
    value = (attributes or {}).get(attribute)
    if value is None:
        raise ValueError(f"the message has no {attribute} attribute")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return parse_event_time(value)


def _payload_text(message: Any) -> str:
    data = getattr(message, "data", message)
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", errors="replace")
    return str(data)


class AssignEventTime(beam.DoFn):
    """Stamps a Pub/Sub message with the event time in its attribute; see the module docstring.

    The element's own timestamp is taken as the message's publish time (what ``ReadFromPubSub``
    gives without ``timestamp_attribute``).
    """

    def __init__(
        self,
        kind: str,
        allowed_lateness_ms: int,
        attribute: str = EVENT_TIME_ATTRIBUTE,
        privacy: PayloadPrivacy | None = None,
    ):
        self._kind = kind
        self._allowed_lateness_ms = allowed_lateness_ms
        self._attribute = attribute
        self._privacy = privacy

    def setup(self) -> None:
        self._read = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_read")
        self._bad_time = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_bad_time")
        self._late = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_late")

    def process(self, message: Any, timestamp: Any = beam.DoFn.TimestampParam):
        self._read.inc()
        try:
            event_ms = event_time_of(getattr(message, "attributes", None), self._attribute)
        except (TypeError, ValueError) as e:
            self._bad_time.inc()
            refusal = DeadLetter(BAD_TIME, self._kind, STEP, str(e), _payload_text(message))
            yield beam.pvalue.TaggedOutput(_REJECTED, self._redacted(refusal, message))
            return
        published_ms = timestamp.micros // 1000
        if published_ms - event_ms > self._allowed_lateness_ms:
            self._late.inc()
            detail = (
                f"published {format_event_time(published_ms)}, "
                f"{published_ms - event_ms} ms after its event time "
                f"{format_event_time(event_ms)}; allowed lateness {self._allowed_lateness_ms} ms"
            )
            refusal = DeadLetter(LATE, self._kind, STEP, detail, _payload_text(message))
            yield beam.pvalue.TaggedOutput(_LATE, self._redacted(refusal, message))
            return
        yield TimestampedValue(message, Timestamp(micros=event_ms * 1000))

    def _redacted(self, refusal: DeadLetter, message: Any) -> DeadLetter:
        if self._privacy is None:
            return refusal
        return redact(refusal, getattr(message, "data", message), self._privacy)


@beam.ptransform_fn
def assign_event_time(
    messages: Any,
    kind: str,
    allowed_lateness_ms: int,
    attribute: str = EVENT_TIME_ATTRIBUTE,
    privacy: PayloadPrivacy | None = None,
) -> PubSubEvents:
    """``AssignEventTime`` on Pub/Sub messages stamped by publish time; ``PubSubEvents``.

    ``kind`` is ``decision`` or ``observation`` (it names the counters and dead letters);
    ``attribute`` holds the event time (``loopline.sinks.PubSubSink`` writes ``event_time``);
    ``privacy`` redacts the payloads of refused and late messages.

        >>> events = messages | assign_event_time("observation", allowed_lateness_ms=600_000)
        >>> parsed = events.messages | ParseObservations(blueprint, format="pubsub")
    """
    if kind not in (DECISION, OBSERVATION):
        raise ValueError(f"kind must be {DECISION!r} or {OBSERVATION!r}, got {kind!r}")
    results = messages | beam.ParDo(
        AssignEventTime(kind, allowed_lateness_ms, attribute, privacy)
    ).with_outputs(_REJECTED, _LATE, main=_MESSAGES)
    return PubSubEvents(results[_MESSAGES], results[_REJECTED], results[_LATE])
