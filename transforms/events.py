"""Parsing PTransforms: raw inputs to validated, event-time-stamped events, with dead letters.

``ParseDecisions`` and ``ParseObservations`` accept one of four input formats:

* ``json``: JSON lines as ``str`` or ``bytes`` (``beam.io.ReadFromText`` and friends);
* ``avro``: records as decoded by ``beam.io.ReadFromAvro`` (fastavro dicts; ``event_time`` may
  be a ``timestamp-millis`` datetime), through ``loopline.avro.from_record``;
* ``record``: already decoded mappings, e.g. BigQuery rows from ``beam.io.ReadFromBigQuery``;
* ``pubsub``: Pub/Sub messages (``PubsubMessage``, whose ``data`` is one JSON event, or the raw
  ``bytes`` that ``ReadFromPubSub`` yields without attributes).

Each event is validated against the blueprint by ``loopline.events`` and re-timestamped to
its event time; every input that cannot become an event leaves on ``rejected`` as a
``loopline.events.DeadLetter`` (reason, source, raw payload, detail). A DoFn here never raises
on bad input: an unexpected exception becomes a refusal with reason ``internal_error``.

With ``privacy`` (a ``loopline.privacy.PayloadPrivacy``), a refusal's payload is redacted where
it is made, so no writer downstream can leak it: a JSON object keeps its shape with the
blueprint's dropped fields removed and pseudonymised ones hashed, anything else is reduced to
``{"sha256", "length"}`` (``loopline.privacy.redact_payload``); an ``internal_error``'s detail
keeps only the exception's type. With ``privacy.quarantine`` set, the raw payload of each
refusal also leaves on ``quarantined`` as a ``loopline.privacy.QuarantinedPayload``, for the
caller to write to its quarantine location (and nowhere else; ``WriteQuarantine`` in a batch
job); otherwise that output is empty.

    >>> parsed = lines | "ParseDecisions" >> ParseDecisions(blueprint, privacy=privacy)
    >>> parsed.events       # DecisionEvent, timestamped by event_time
    >>> parsed.rejected     # DeadLetter, payload redacted
    >>> parsed.quarantined  # QuarantinedPayload, with privacy.quarantine only
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline import avro
from loopline.blueprint import Blueprint
from loopline.events import (
    BAD_JSON,
    DECISION,
    OBSERVATION,
    DeadLetter,
    decision_from_record,
    observation_from_record,
    parse_decision_json,
    parse_observation_json,
    refusal,
)
from loopline.privacy import PayloadPrivacy, QuarantinedPayload, digest
from loopline.vocabulary import PARSE_FORMATS as FORMATS
from loopline.vocabulary import Reason

INTERNAL_ERROR = Reason.INTERNAL_ERROR
METRICS_NAMESPACE = "loopline.parse"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EVENTS = "events"
_REJECTED = "rejected"
_QUARANTINED = "quarantined"


class ParsedEvents(NamedTuple):
    """The outputs of a parse transform."""

    events: object  # PCollection[DecisionEvent | ObservationEvent], timestamped by event time
    rejected: object  # PCollection[loopline.events.DeadLetter]
    quarantined: object = None  # PCollection[QuarantinedPayload]: empty unless quarantining


def parse_one(raw: Any, kind: str, fmt: str, blueprint: Blueprint | None):
    """One raw input to an event or a ``DeadLetter``; never raises.

    ``kind`` is ``decision`` or ``observation``, ``fmt`` one of FORMATS.
    """
    try:
        return _parse(raw, kind, fmt, blueprint)
    except Exception as e:  # noqa: BLE001 - bad input must never crash the pipeline
        return refusal(INTERNAL_ERROR, kind, _payload_text(raw), f"{type(e).__name__}: {e}")


def _parse(raw: Any, kind: str, fmt: str, blueprint: Blueprint | None):
    if fmt == "pubsub":
        raw = raw if isinstance(raw, bytes | bytearray | str) else getattr(raw, "data", raw)
        fmt = "json"
    if fmt == "json":
        if not isinstance(raw, str | bytes | bytearray):
            return refusal(
                BAD_JSON,
                kind,
                _payload_text(raw),
                f"expected a JSON line, got {type(raw).__name__}",
            )
        if kind == DECISION:
            return parse_decision_json(raw, blueprint)
        return parse_observation_json(raw, blueprint)
    if fmt == "avro":
        return avro.from_record(raw, kind, blueprint)
    if kind == DECISION:
        return decision_from_record(_as_dict(raw), blueprint)
    return observation_from_record(_as_dict(raw), blueprint)


def _as_dict(record: Any) -> Any:
    # BigQuery rows arrive as dicts (TIMESTAMP columns as datetimes); Beam Rows and named
    # tuples are turned into one.
    if hasattr(record, "_asdict") and not isinstance(record, dict):
        record = dict(record._asdict())
    if isinstance(record, dict) and isinstance(record.get("event_time"), datetime):
        moment = record["event_time"]
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        record = {**record, "event_time": (moment - _EPOCH) // timedelta(milliseconds=1)}
    return record


def redact(refusal: DeadLetter, raw: Any, privacy: PayloadPrivacy) -> DeadLetter:
    """``refusal`` with its payload redacted by ``privacy`` from the ``raw`` input; never raises.

    The raw bytes where there are any (a JSON line, a Pub/Sub message's data), else the
    refusal's JSON form of the record (Avro, BigQuery).
    """
    detail = refusal.detail
    if refusal.reason == INTERNAL_ERROR:
        detail = detail.partition(":")[0]  # an exception's message may quote a value
    data = _raw_bytes(raw, refusal)
    try:
        payload = privacy.redact(data)
    except Exception:  # noqa: BLE001 - whatever went wrong, the raw payload must not leave
        payload = digest(data)
    return dataclasses.replace(refusal, payload=payload, detail=detail)


def quarantined(refusal: DeadLetter, raw: Any) -> QuarantinedPayload:
    """The raw input of ``refusal``, for the quarantine location."""
    data = _raw_bytes(raw, refusal)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return QuarantinedPayload(refusal.source, refusal.reason, bytes(data))


def _raw_bytes(raw: Any, refusal: DeadLetter) -> bytes | str:
    if isinstance(raw, str | bytes | bytearray):
        return raw
    data = getattr(raw, "data", None)
    if isinstance(data, bytes | bytearray):
        return data
    return refusal.payload


def _payload_text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("utf-8", errors="replace")
    data = getattr(raw, "data", None)
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", errors="replace")
    try:
        return json.dumps(raw, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(raw)


class _ParseDoFn(beam.DoFn):
    """Parses one input; events go out timestamped by event time, refusals on ``rejected``."""

    def __init__(
        self, kind: str, fmt: str, blueprint: Blueprint | None, privacy: PayloadPrivacy | None
    ):
        self._kind = kind
        self._fmt = fmt
        self._blueprint = blueprint
        self._privacy = privacy

    def setup(self) -> None:
        self._parsed_counter = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_parsed")
        self._rejected_total = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_rejected")
        self._rejected_counters: dict[str, Any] = {}

    def start_bundle(self) -> None:
        self._parsed = 0

    def process(self, raw: Any):
        result = parse_one(raw, self._kind, self._fmt, self._blueprint)
        if isinstance(result, DeadLetter):
            self._rejected_total.inc()
            self._rejected_counter(result.reason).inc()
            if self._privacy is not None:
                if self._privacy.quarantine:
                    yield beam.pvalue.TaggedOutput(_QUARANTINED, quarantined(result, raw))
                result = redact(result, raw, self._privacy)
            yield beam.pvalue.TaggedOutput(_REJECTED, result)
            return
        self._parsed += 1
        yield TimestampedValue(result, Timestamp(micros=result.event_time_ms * 1000))

    def finish_bundle(self) -> None:
        if self._parsed:
            self._parsed_counter.inc(self._parsed)
        self._parsed = 0

    def _rejected_counter(self, reason: str):
        counter = self._rejected_counters.get(reason)
        if counter is None:
            counter = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}s_rejected_{reason}")
            self._rejected_counters[reason] = counter
        return counter


class _Parse(beam.PTransform):
    def __init__(
        self,
        kind: str,
        blueprint: Blueprint | None,
        format: str,
        privacy: PayloadPrivacy | None = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self._kind = kind
        self._blueprint = blueprint
        self._format = format
        self._privacy = privacy

    def expand(self, raw) -> ParsedEvents:
        results = raw | f"Parse[{self._format}]" >> beam.ParDo(
            _ParseDoFn(self._kind, self._format, self._blueprint, self._privacy)
        ).with_outputs(_REJECTED, _QUARANTINED, main=_EVENTS)
        return ParsedEvents(
            events=results[_EVENTS],
            rejected=results[_REJECTED],
            quarantined=results[_QUARANTINED],
        )


class ParseDecisions(_Parse):
    """Raw decision inputs to ``DecisionEvent`` (timestamped by event time) and refusals.

    Counters in namespace ``loopline.parse``: ``decisions_parsed``, ``decisions_rejected`` and
    one ``decisions_rejected_<reason>`` per refusal reason. ``privacy`` redacts refused
    payloads (see the module docstring).

        >>> parsed = p | beam.io.ReadFromText("logs/decisions-*.jsonl") | ParseDecisions(blueprint)
        >>> parsed.events, parsed.rejected
    """

    def __init__(
        self,
        blueprint: Blueprint | None,
        format: str = "json",
        privacy: PayloadPrivacy | None = None,
    ):
        super().__init__(DECISION, blueprint, format, privacy)


class ParseObservations(_Parse):
    """Raw observation inputs to ``ObservationEvent`` (timestamped by event time) and refusals.

    Counters in namespace ``loopline.parse``: ``observations_parsed``,
    ``observations_rejected`` and one ``observations_rejected_<reason>`` per refusal reason.
    ``privacy`` redacts refused payloads (see the module docstring).

        >>> parsed = p | beam.io.ReadFromAvro("logs/observations-*.avro") | ParseObservations(
        ...     blueprint, format="avro")
    """

    def __init__(
        self,
        blueprint: Blueprint | None,
        format: str = "json",
        privacy: PayloadPrivacy | None = None,
    ):
        super().__init__(OBSERVATION, blueprint, format, privacy)


class WriteQuarantine(beam.PTransform):
    """Writes quarantined raw payloads (one PCollection, or several as a tuple) as JSON lines
    ``LOCATION/part-*.jsonl`` (``QuarantinedPayload.to_json``): batch jobs only.

    The location is the only place raw refused payloads go; give it its own access control.

        >>> _ = (decisions.quarantined, observations.quarantined) | WriteQuarantine(location)
    """

    def __init__(self, location: str):
        super().__init__()
        self._location = location

    def expand(self, quarantined):
        if isinstance(quarantined, tuple | list):
            quarantined = quarantined | "Flatten" >> beam.Flatten()
        return (
            quarantined
            | "ToJson" >> beam.Map(QuarantinedPayload.to_json)
            | "Write" >> beam.io.WriteToText(FileSystems.join(self._location, "part"), ".jsonl")
        )


__all__ = [
    "FORMATS",
    "INTERNAL_ERROR",
    "ParseDecisions",
    "ParseObservations",
    "ParsedEvents",
    "WriteQuarantine",
    "parse_one",
    "quarantined",
    "redact",
]
