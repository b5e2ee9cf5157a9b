"""Avro files of decision and observation events, read and written with fastavro.

The schemas live next to this module (``schemas/*.avsc``). Avro's ``timestamp-millis`` comes back
from fastavro as a datetime; the readers hand records to the same validators as JSON lines, so an
Avro event and its JSON twin parse to equal events.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import IO, Any

import fastavro

from loopline.blueprint import Blueprint
from loopline.events import (
    BAD_AVRO,
    DECISION,
    OBSERVATION,
    DeadLetter,
    DecisionEvent,
    ObservationEvent,
    decision_from_record,
    observation_from_record,
    refusal,
)

SCHEMA_DIR = Path(__file__).parent / "schemas"


@cache
def schema(kind: str) -> dict:
    """The parsed Avro schema for ``decision`` or ``observation`` events."""
    if kind not in (DECISION, OBSERVATION):
        raise ValueError(f"kind must be {DECISION!r} or {OBSERVATION!r}, got {kind!r}")
    with open(SCHEMA_DIR / f"{kind}.avsc", encoding="utf-8") as f:
        return fastavro.parse_schema(json.load(f))


def write_events(
    fo: IO[bytes], kind: str, events: Iterable[DecisionEvent | ObservationEvent]
) -> int:
    """Writes events as one Avro container file; returns how many were written."""
    records = [to_record(e) for e in events]
    fastavro.writer(fo, schema(kind), records)
    return len(records)


def to_record(event: DecisionEvent | ObservationEvent) -> dict:
    """An event as an Avro record of its schema."""
    record = {"decision_id": event.decision_id, "event_time": event.event_time_ms}
    if isinstance(event, DecisionEvent):
        record.update(
            decision_type=event.decision_type,
            features=event.features,
            blueprint_version=event.blueprint_version,
            decision=event.decision,
            model_id=event.model_id,
            propensity=event.propensity,
            score=event.score,
            arm=event.arm,
        )
    else:
        record["observations"] = event.observations
    return record


def from_record(
    record: Any, kind: str, blueprint: Blueprint | None = None
) -> DecisionEvent | ObservationEvent | DeadLetter:
    """One decoded Avro record to an event or a refusal (the same rules as JSON lines)."""
    payload = _payload(record)
    if not isinstance(record, dict):
        return refusal(BAD_AVRO, kind, payload, "an Avro event must be a record")
    record = dict(record)
    if isinstance(record.get("event_time"), datetime):
        moment = record["event_time"]
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        record["event_time"] = int(moment.timestamp() * 1000)
    if kind == DECISION:
        return decision_from_record(record, blueprint, payload)
    return observation_from_record(record, blueprint, payload)


def read_events(
    fo: IO[bytes], kind: str, blueprint: Blueprint | None = None
) -> Iterator[DecisionEvent | ObservationEvent | DeadLetter]:
    """Every record of an Avro container file as an event or a refusal."""
    for record in fastavro.reader(fo):
        yield from_record(record, kind, blueprint)


def _payload(record: Any) -> str:
    return json.dumps(record, sort_keys=True, default=str)
