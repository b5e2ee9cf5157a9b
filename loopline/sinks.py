"""Where the decision client sends its events: local JSON-lines files, Pub/Sub or BigQuery.

Every sink takes ``DecisionEvent`` and ``ObservationEvent`` objects through ``write``, pushes
anything it holds with ``flush`` and releases its resources with ``close`` (or a ``with``
block). All sinks are safe to share between threads.

    >>> with JsonLinesSink("LOGS") as sink:
    ...     sink.write(decision_event)
    >>> sorted(p.name for p in Path("LOGS").glob("*.jsonl"))
    ['decisions-20261101T120000Z-00000.jsonl']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from loopline.events import (
    DECISION,
    OBSERVATION,
    DecisionEvent,
    ObservationEvent,
    format_event_time,
)

Event = DecisionEvent | ObservationEvent
KINDS = (DECISION, OBSERVATION)
IN_PROGRESS_SUFFIX = ".inprogress"
log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """Events a sink could not deliver; ``failures`` holds (event or row, error) pairs."""

    def __init__(self, message: str, failures: Sequence[tuple[Any, Any]] = ()):
        super().__init__(message)
        self.failures = list(failures)


@runtime_checkable
class EventSink(Protocol):
    """What the decision client writes to."""

    def write(self, event: Event) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> EventSink: ...

    def __exit__(self, *exc: object) -> None: ...


def event_kind(event: Event) -> str:
    """``decision`` or ``observation``; a TypeError for anything else."""
    if isinstance(event, DecisionEvent):
        return DECISION
    if isinstance(event, ObservationEvent):
        return OBSERVATION
    raise TypeError(f"a sink takes DecisionEvent or ObservationEvent, got {type(event).__name__}")


class _ClosingContext:
    """``with sink:`` closes the sink on the way out, also after an error."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Local JSON-lines files


class _OpenFile:
    """One file being written: its handle, final name, size and the clock time it was opened."""

    def __init__(self, final_path: Path, opened_at: float):
        self.final_path = final_path
        self.path = final_path.with_name(final_path.name + IN_PROGRESS_SUFFIX)
        self.handle = open(self.path, "xb")  # noqa: SIM115 - closed on rotation or close()
        self.size = 0
        self.lines = 0
        self.opened_at = opened_at


class JsonLinesSink(_ClosingContext):
    """The embedded default: one JSON object per line, decisions and observations apart.

    Decisions go to ``decisions-<UTC start stamp>-<seq>.jsonl`` and observations to
    ``observations-<stamp>-<seq>.jsonl`` under ``directory``. A file is written under the same
    name plus ``.inprogress`` and renamed to its final name when it rotates (once it would pass
    ``max_bytes``, or is ``max_age_s`` old by ``clock`` at a write or flush) or when the sink
    closes, so a reader globbing ``*.jsonl`` only ever sees whole files of whole lines. Every
    line is written with one call under a lock, so threads sharing a sink never interleave.

    ``clock`` returns epoch seconds (``time.time`` by default; the simulator passes simulated
    time). Age is checked on each write and flush; ``auto_flush_s`` starts a background thread
    that flushes that often, so a quiet service still finishes its files within
    ``max_age_s + auto_flush_s``. ``writer_id`` goes into the file names when several processes
    share a directory. A crashed writer leaves its ``.inprogress`` file behind: whole lines up
    to the last write.
    """

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        writer_id: str | None = None,
        fsync: bool = False,
        auto_flush_s: float | None = None,
    ):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.writer_id = writer_id
        self.fsync = fsync
        self._lock = threading.Lock()
        self._open: dict[str, _OpenFile] = {}
        self._seq = 0
        self._closed = False
        self.finished_files: list[Path] = []
        self.lines_written = {DECISION: 0, OBSERVATION: 0}
        self._stop = threading.Event()
        self._flusher = None
        if auto_flush_s is not None:
            if auto_flush_s <= 0:
                raise ValueError(f"auto_flush_s must be positive, got {auto_flush_s}")
            self._flusher = threading.Thread(
                target=self._flush_every,
                args=(auto_flush_s,),
                name="JsonLinesSink.flush",
                daemon=True,
            )
            self._flusher.start()

    def write(self, event: Event) -> None:
        """Appends one event as a JSON line to the file of its kind."""
        self._append(event_kind(event), event.to_json())

    def write_raw(self, kind: str, line: str) -> None:
        """Appends one line as it is (e.g. a malformed one, to test what reads the logs)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if "\n" in line or "\r" in line:
            raise ValueError("a raw line must not contain a line break")
        self._append(kind, line)

    def flush(self) -> None:
        """Pushes buffered lines to the OS and finishes files that are past ``max_age_s``."""
        with self._lock:
            now = self.clock()
            for kind, current in list(self._open.items()):
                if now - current.opened_at >= self.max_age_s:
                    self._finish(kind)
                else:
                    current.handle.flush()

    def close(self) -> None:
        """Finishes every open file (renaming it to ``*.jsonl``); later writes raise."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join()
        with self._lock:
            for kind in list(self._open):
                self._finish(kind)
            self._closed = True

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a full disk must not kill the thread silently
                log.exception("flushing %s failed", self.directory)

    def _append(self, kind: str, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                raise ValueError("the sink is closed")
            now = self.clock()
            current = self._open.get(kind)
            if current is not None and (
                now - current.opened_at >= self.max_age_s
                or (current.size and current.size + len(data) > self.max_bytes)
            ):
                self._finish(kind)
                current = None
            if current is None:
                current = self._start(kind, now)
            current.handle.write(data)
            current.size += len(data)
            current.lines += 1
            self.lines_written[kind] += 1

    def _start(self, kind: str, now: float) -> _OpenFile:
        stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        writer = f"-{self.writer_id}" if self.writer_id else ""
        while True:
            name = f"{kind}s-{stamp}{writer}-{self._seq:05d}.jsonl"
            self._seq += 1
            final = self.directory / name
            if not final.exists() and not final.with_name(name + IN_PROGRESS_SUFFIX).exists():
                break
        current = _OpenFile(final, now)
        self._open[kind] = current
        return current

    def _finish(self, kind: str) -> None:
        current = self._open.pop(kind)
        current.handle.flush()
        if self.fsync:
            os.fsync(current.handle.fileno())
        current.handle.close()
        os.replace(current.path, current.final_path)
        self.finished_files.append(current.final_path)


# ---------------------------------------------------------------------------------------------
# Google Cloud Pub/Sub


class PubSubSink(_ClosingContext):
    """Publishes each event as one Pub/Sub message (JSON payload) to its kind's topic.

    Attributes: ``event_time`` (RFC 3339, for ``ReadFromPubSub(timestamp_attribute=...)``),
    ``decision_id`` and ``kind``. The publisher batches; ``flush`` waits for every message
    published so far and raises ``SinkError`` naming the ones that failed.

    ``publisher`` is a ``google.cloud.pubsub_v1.PublisherClient`` (or anything with its
    ``publish(topic, data, **attrs) -> future``); when None, one is built with
    ``batch_settings`` (default: 100 messages, 1 MB or 50 ms, whichever comes first).

        >>> sink = PubSubSink(None, "projects/p/topics/notify-decisions",
        ...                   "projects/p/topics/notify-observations")
    """

    def __init__(
        self,
        publisher: Any,
        decisions_topic: str,
        observations_topic: str,
        batch_settings: Any = None,
        timeout_s: float = 60.0,
        credentials: Any = None,
    ):
        self._owns_publisher = publisher is None
        if publisher is None:
            from google.cloud import pubsub_v1

            if batch_settings is None:
                batch_settings = pubsub_v1.types.BatchSettings(
                    max_messages=100, max_bytes=1_000_000, max_latency=0.05
                )
            publisher = pubsub_v1.PublisherClient(
                batch_settings=batch_settings, credentials=credentials
            )
        self.publisher = publisher
        self.topics = {DECISION: decisions_topic, OBSERVATION: observations_topic}
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pending: list[tuple[Event, Any]] = []
        self._closed = False
        self.published = 0

    def write(self, event: Event) -> None:
        kind = event_kind(event)
        data = event.to_json().encode("utf-8")
        with self._lock:
            if self._closed:
                raise ValueError("the sink is closed")
            future = self.publisher.publish(
                self.topics[kind],
                data,
                event_time=format_event_time(event.event_time_ms),
                decision_id=event.decision_id,
                kind=kind,
            )
            self._pending.append((event, future))

    def flush(self) -> None:
        """Waits for every message published so far; raises SinkError if any failed."""
        with self._lock:
            pending, self._pending = self._pending, []
        failures = []
        for event, future in pending:
            try:
                future.result(timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append((event, e))
        self.published += len(pending) - len(failures)
        if failures:
            raise SinkError(
                f"{len(failures)} of {len(pending)} Pub/Sub messages failed; "
                f"first: {failures[0][1]!r}",
                failures,
            )

    def close(self) -> None:
        """Flushes, then stops the publisher if this sink built it."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
            if self._owns_publisher:
                self.publisher.stop()


# ---------------------------------------------------------------------------------------------
# BigQuery streaming inserts

# Table schemas for ``bq mk --schema`` / ``bigquery.SchemaField.from_api_repr``. features and
# observations are JSON columns; streaming inserts take them as JSON text.
DECISIONS_TABLE_SCHEMA = [
    {"name": "decision_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "decision_type", "type": "STRING", "mode": "REQUIRED"},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
    {"name": "features", "type": "JSON", "mode": "REQUIRED"},
    {"name": "blueprint_version", "type": "STRING", "mode": "NULLABLE"},
    {"name": "decision", "type": "JSON", "mode": "NULLABLE"},
    {"name": "model_id", "type": "STRING", "mode": "NULLABLE"},
    {"name": "propensity", "type": "FLOAT64", "mode": "NULLABLE"},
]
OBSERVATIONS_TABLE_SCHEMA = [
    {"name": "decision_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "event_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
    {"name": "observations", "type": "JSON", "mode": "REQUIRED"},
]


def bigquery_row(event: Event) -> dict:
    """The streaming-insert row of an event: its JSON form, with the maps as JSON text."""
    row = event.to_dict()
    for key in ("features", "observations", "decision"):
        if key in row:
            row[key] = json.dumps(row[key], sort_keys=True, separators=(",", ":"))
    return row


def row_id(event: Event) -> str:
    """A stable insert id: the same event always gets the same id, so BigQuery drops repeats."""
    text = f"{event_kind(event)}\n{event.to_json()}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class BigQuerySink(_ClosingContext):
    """Buffers events and streams them into two tables with ``insert_rows_json``.

    A table's buffer is sent when it holds ``batch_size`` rows and on ``flush``. Each row
    carries ``row_id(event)`` as its insert id, so a retried insert is deduplicated. Rows
    BigQuery refuses are reported to ``on_row_errors(failures)`` when given, otherwise raised as
    ``SinkError``; they are not retried. If the request itself fails, the rows stay buffered
    for the next flush and the error is raised.

    ``client`` is a ``google.cloud.bigquery.Client`` (or anything with its ``insert_rows_json``).

        >>> sink = BigQuerySink(bigquery.Client(), "proj.loopline.notify_decisions",
        ...                     "proj.loopline.notify_observations", batch_size=500)
    """

    def __init__(
        self,
        client: Any,
        decisions_table: str,
        observations_table: str,
        batch_size: int = 500,
        on_row_errors: Callable[[list[tuple[dict, Any]]], None] | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.client = client
        self.tables = {DECISION: decisions_table, OBSERVATION: observations_table}
        self.batch_size = batch_size
        self.on_row_errors = on_row_errors
        self._lock = threading.Lock()
        self._buffers: dict[str, list[Event]] = {DECISION: [], OBSERVATION: []}
        self._closed = False
        self.inserted = 0

    def write(self, event: Event) -> None:
        kind = event_kind(event)
        with self._lock:
            if self._closed:
                raise ValueError("the sink is closed")
            self._buffers[kind].append(event)
            if len(self._buffers[kind]) >= self.batch_size:
                self._send(kind)

    def flush(self) -> None:
        """Sends every buffered row."""
        with self._lock:
            for kind in KINDS:
                self._send(kind)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True

    def _send(self, kind: str) -> None:
        events = self._buffers[kind]
        while events:
            batch = events[: self.batch_size]
            rows = [bigquery_row(e) for e in batch]
            errors = self.client.insert_rows_json(
                self.tables[kind], rows, row_ids=[row_id(e) for e in batch]
            )
            # The request went through: these rows are either in BigQuery or refused for good.
            del events[: len(batch)]
            failures = [(rows[err["index"]], err.get("errors")) for err in errors or []]
            self.inserted += len(batch) - len(failures)
            if failures:
                if self.on_row_errors is not None:
                    self.on_row_errors(failures)
                else:
                    raise SinkError(
                        f"BigQuery refused {len(failures)} of {len(batch)} rows for "
                        f"{self.tables[kind]}; first: {failures[0][1]!r}",
                        failures,
                    )
