"""Where decision and observation events come from: files, BigQuery tables, Pub/Sub.

``ReadEvents`` builds one of Beam's sources and says which parse format its elements need, so a
pipeline reads and parses the same way whatever the source:

    >>> source = ReadEvents(DECISION, pattern="logs/decisions-*.jsonl")
    >>> raw = p | "ReadDecisions" >> source
    >>> parsed = raw | "ParseDecisions" >> ParseDecisions(blueprint, format=source.parse_format)

* files: JSON lines through ``ReadFromText`` or Avro through ``ReadFromAvro`` (``format``
  ``auto`` picks Avro for a pattern ending in ``.avro``, JSON lines otherwise);
* BigQuery: ``ReadFromBigQuery`` rows, with ``TIMESTAMP`` columns as epoch milliseconds and
  JSON-string ``features`` / ``observations`` columns decoded (``format="record"``);
* Pub/Sub: ``ReadFromPubSub`` messages with attributes, element timestamps taken from the
  ``event_time`` attribute (``format="pubsub"``), for streaming jobs.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import apache_beam as beam

from loopline.events import DECISION, OBSERVATION

FILE_FORMATS = ("auto", "json", "avro")
EVENT_TIME_ATTRIBUTE = "event_time"
_JSON_COLUMNS = ("features", "observations")
_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def detect_format(pattern: str, format: str = "auto") -> str:
    """``json`` or ``avro`` for a file pattern: the explicit ``format``, else by extension.

    >>> detect_format("logs/decisions-*.avro"), detect_format("logs/decisions-*.jsonl")
    ('avro', 'json')
    """
    if format not in FILE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(FILE_FORMATS)}, got {format!r}")
    if format != "auto":
        return format
    return "avro" if pattern.rstrip("*").lower().endswith(".avro") else "json"


def bigquery_row_to_record(row: dict) -> dict:
    """A BigQuery row as an event record: timestamps to epoch ms, JSON-string columns decoded.

    BigQuery hands ``TIMESTAMP`` columns back as datetimes (Avro export) and ``JSON`` columns as
    strings; the event parsers want epoch milliseconds and mappings. A string that is not JSON
    is left alone, so the parser refuses it with the usual reason.
    """
    record = dict(row)
    moment = record.get("event_time")
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        record["event_time"] = (moment - _EPOCH) // _MS
    for column in _JSON_COLUMNS:
        value = record.get(column)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                record[column] = json.loads(value)
    return record


class ReadEvents(beam.PTransform):
    """Raw decision or observation inputs from exactly one source; see ``parse_format``.

    Args:
        kind: ``decision`` or ``observation`` (names the steps).
        pattern: a file glob of JSON lines or Avro files (any Beam filesystem).
        table: a BigQuery table ``project:dataset.table`` or ``project.dataset.table``.
        subscription: a Pub/Sub subscription ``projects/P/subscriptions/S`` (streaming).
        format: for files, ``auto`` (by extension), ``json`` or ``avro``.
        bigquery_options: extra keyword arguments for ``ReadFromBigQuery`` (e.g. ``method``,
            ``gcs_location``).

    >>> raw = p | ReadEvents("observation", subscription="projects/p/subscriptions/obs")
    """

    def __init__(
        self,
        kind: str,
        pattern: str | None = None,
        table: str | None = None,
        subscription: str | None = None,
        format: str = "auto",
        bigquery_options: dict | None = None,
    ):
        super().__init__()
        if kind not in (DECISION, OBSERVATION):
            raise ValueError(f"kind must be {DECISION!r} or {OBSERVATION!r}, got {kind!r}")
        given = [
            name
            for name, value in (
                ("pattern", pattern),
                ("table", table),
                ("subscription", subscription),
            )
            if value
        ]
        if len(given) != 1:
            raise ValueError(
                f"read {kind}s from exactly one of a file pattern, a BigQuery table or a Pub/Sub "
                f"subscription, got {', '.join(given) or 'none'}"
            )
        self.kind = kind
        self.pattern = pattern
        self.table = table
        self.subscription = subscription
        self.bigquery_options = dict(bigquery_options or {})
        if pattern:
            self.parse_format = detect_format(pattern, format)
        elif table:
            self.parse_format = "record"
        else:
            self.parse_format = "pubsub"

    @property
    def is_streaming(self) -> bool:
        return bool(self.subscription)

    def expand(self, pbegin: beam.pvalue.PBegin) -> Any:
        if self.pattern and self.parse_format == "avro":
            return pbegin | "ReadAvro" >> beam.io.ReadFromAvro(self.pattern)
        if self.pattern:
            return pbegin | "ReadJsonLines" >> beam.io.ReadFromText(self.pattern)
        if self.table:
            return (
                pbegin
                | "ReadBigQuery"
                >> beam.io.ReadFromBigQuery(table=self.table, **self.bigquery_options)
                | "RowsToRecords" >> beam.Map(bigquery_row_to_record)
            )
        return pbegin | "ReadPubSub" >> beam.io.ReadFromPubSub(
            subscription=self.subscription,
            with_attributes=True,
            timestamp_attribute=EVENT_TIME_ATTRIBUTE,
        )
