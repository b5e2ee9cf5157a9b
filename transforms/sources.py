"""Where decision and observation events come from: files, BigQuery tables, Pub/Sub.

``ReadEvents`` builds one of Beam's sources and says which parse format its elements need, so a
pipeline reads and parses the same way whatever the source:

    >>> source = ReadEvents(DECISION, pattern="logs/decisions-*.jsonl")
    >>> raw = p | "ReadDecisions" >> source
    >>> parsed = raw | "ParseDecisions" >> ParseDecisions(blueprint, format=source.parse_format)

* files: JSON lines through ``ReadFromText``, Avro through ``ReadFromAvro`` or, for decisions
  to score, the join's tf.Example TFRecords through ``ReadFromTFRecord`` (``format`` ``auto``
  goes by the pattern's extension: ``.avro``, ``.tfrecord``/``.tfr``, else JSON lines). Lines
  are read as ``bytes``: a line that is not UTF-8 reaches the parser, which refuses it as
  ``bad_json``, instead of failing the whole read in ``ReadFromText``'s decoder. A pattern
  that matches no file fails when the pipeline is built, with ``NoFilesMatched``;
* BigQuery: ``ReadFromBigQuery`` rows, with ``TIMESTAMP`` columns as epoch milliseconds and
  JSON-string ``features`` / ``observations`` columns decoded (``format="record"``);
* Pub/Sub: ``ReadFromPubSub`` messages with attributes, timestamped by their publish time
  (``format="pubsub"``), for streaming jobs; ``transforms.streaming.assign_event_time`` then
  stamps them with their ``event_time`` attribute.

With ``batching`` (``beam.BatchElements``' arguments) a batch job's elements are lists of raw
inputs rather than single ones, for steps that work a batch at a time (bulk scoring): JSON
lines are then read in chunks (``ReadLineBatches``), so no step sees single lines.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from loopline.events import DECISION, OBSERVATION
from loopline.vocabulary import SCORING_FILE_FORMATS, Format

EVENT_TIME_ATTRIBUTE = "event_time"
_JSON_COLUMNS = ("features", "observations")
_MS = timedelta(milliseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
READ_NAMESPACE = "loopline.read"
DEFAULT_SPLIT_BYTES = 64 << 20
READ_BLOCK_BYTES = 1 << 20


def detect_format(pattern: str, format: str = "auto") -> str:
    """``json``, ``avro`` or ``tfrecord`` for a file pattern: the explicit ``format``, else by
    the pattern's extension.

    >>> detect_format("logs/decisions-*.avro"), detect_format("logs/decisions-*.jsonl")
    ('avro', 'json')
    >>> detect_format("data/notify/*/examples/eval/*.tfrecord.gz")
    'tfrecord'
    """
    if format not in SCORING_FILE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SCORING_FILE_FORMATS)}, got {format!r}")
    if format != Format.AUTO:
        return Format(format).value
    name = pattern.rstrip("*").lower()
    if name.endswith(".avro"):
        return Format.AVRO.value
    if ".tfrecord" in name or name.endswith((".tfr", ".tfr.gz")):
        return Format.TFRECORD.value
    return Format.JSON.value


def bigquery_row_to_record(row: dict) -> dict:
    """A BigQuery row as an event record: timestamps to epoch ms, JSON-string columns decoded.

    BigQuery hands ``TIMESTAMP`` columns back as datetimes (Avro export) and ``JSON`` columns as
    strings; the event parsers want epoch milliseconds and mappings. A string that is not JSON
    (or nests too deeply to read) is left alone, so the parser refuses it with the usual reason.
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
            with contextlib.suppress(ValueError, RecursionError):
                record[column] = json.loads(value)
    return record


class ReadEvents(beam.PTransform):
    """Raw decision or observation inputs from exactly one source; see ``parse_format``.

    Args:
        kind: ``decision`` or ``observation`` (names the steps).
        pattern: a file glob of JSON lines or Avro files (any Beam filesystem).
        table: a BigQuery table ``project:dataset.table`` or ``project.dataset.table``.
        subscription: a Pub/Sub subscription ``projects/P/subscriptions/S`` (streaming).
        format: for files, ``auto`` (by extension), ``json``, ``avro`` or (decisions only)
            ``tfrecord``.
        bigquery_options: extra keyword arguments for ``ReadFromBigQuery`` (e.g. ``method``,
            ``gcs_location``).
        batching: ``beam.BatchElements``' arguments: the elements are then lists of raw
            inputs (not for Pub/Sub). JSON lines are read ``min_batch_size`` lines at a time
            and batched by line count (split back into lines first under
            ``max_batch_duration_secs``, stateful batching, which counts elements).
        validate: match a file pattern when the transform is applied, i.e. when the pipeline
            is built and before anything runs (as ``ReadFromText`` does), and raise
            ``NoFilesMatched`` (a ValueError), naming the join's flag (``--decisions`` or
            ``--observations``) and the pattern, in one sentence when it matches no file.

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
        validate: bool = True,
        batching: dict | None = None,
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
        self.validate = validate
        if pattern:
            self.parse_format = detect_format(pattern, format)
        elif table:
            self.parse_format = Format.RECORD.value
        else:
            self.parse_format = Format.PUBSUB.value
        if self.parse_format == Format.TFRECORD and kind != DECISION:
            raise ValueError(f"TFRecord examples are decisions, not {kind}s: {pattern}")
        if batching is not None and subscription:
            raise ValueError("batching is for files and tables; Pub/Sub is read event by event")
        self.batching = None if batching is None else dict(batching)

    @property
    def is_streaming(self) -> bool:
        return bool(self.subscription)

    def expand(self, pbegin: beam.pvalue.PBegin) -> Any:
        if self.pattern and self.validate:
            # Here rather than in __init__: a launcher makes its sources while it checks its
            # arguments, and a usage error found later must not be hidden behind this one.
            require_files(self.pattern, f"--{self.kind}s")
        if self.batching is not None and self.parse_format == Format.JSON:
            return pbegin | "ReadLineBatches" >> _BatchedLines(self.pattern, self.batching)
        raw = pbegin | self._read()
        if self.batching is None:
            return raw
        return raw | "Batch" >> beam.BatchElements(**self.batching)

    def _read(self) -> beam.PTransform:
        """The source itself: one raw input per element."""
        if self.parse_format == Format.AVRO:
            return "ReadAvro" >> beam.io.ReadFromAvro(self.pattern, validate=self.validate)
        if self.parse_format == Format.TFRECORD:
            return "ReadTFRecord" >> beam.io.ReadFromTFRecord(self.pattern, validate=self.validate)
        if self.pattern:
            return "ReadJsonLines" >> beam.io.ReadFromText(
                self.pattern, coder=coders.BytesCoder(), validate=self.validate
            )
        if self.table:
            return "ReadBigQuery" >> _ReadBigQueryRecords(self.table, self.bigquery_options)
        # No timestamp_attribute: a value that does not parse would fail the read and be
        # redelivered forever. Elements carry their publish time; transforms.streaming's
        # AssignEventTime stamps them with the attribute, refusing bad ones as bad_time.
        return "ReadPubSub" >> beam.io.ReadFromPubSub(
            subscription=self.subscription, with_attributes=True
        )


class _ReadBigQueryRecords(beam.PTransform):
    """BigQuery rows as event records (``bigquery_row_to_record``)."""

    def __init__(self, table: str, options: dict):
        super().__init__()
        self._table = table
        self._options = options

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Read" >> beam.io.ReadFromBigQuery(table=self._table, **self._options)
            | "RowsToRecords" >> beam.Map(bigquery_row_to_record)
        )


class _BatchedLines(beam.PTransform):
    """JSON lines as batches of ``batching``'s size: chunks of ``min_batch_size`` lines
    (``ReadLineBatches``), batched by line count so every batch holds min to max lines (but the
    last of a file range); with ``max_batch_duration_secs`` the chunks are split back into
    lines first (stateful batching counts elements)."""

    def __init__(self, pattern: str, batching: dict):
        super().__init__()
        self._pattern = pattern
        self._batching = batching

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        batching = self._batching
        chunks = pbegin | "Chunks" >> ReadLineBatches(
            self._pattern, batch_lines=batching.get("min_batch_size", 1)
        )
        if "max_batch_duration_secs" in batching:
            return (
                chunks
                | "Lines" >> beam.FlatMap(_lines_of)
                | "Batch" >> beam.BatchElements(**batching)
            )
        return (
            chunks
            | "Batch" >> beam.BatchElements(element_size_fn=len, **batching)
            | "JoinChunks" >> beam.Map(_join_chunks)
        )


def _join_chunks(chunks: list[list]) -> list:
    """Batched chunks of lines as one batch of lines."""
    return list(itertools.chain.from_iterable(chunks))


def _lines_of(chunk: list) -> list:
    return chunk


def require_files(pattern: str, flag: str) -> None:
    """Raises ``NoFilesMatched`` with one sentence, naming ``flag``, when ``pattern`` matches no
    file (or cannot be listed): what a launcher checks before it builds a pipeline."""
    try:
        files = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - Beam's BeamIOError carries a per-pattern dict
        raise NoFilesMatched(f"{flag} {pattern!r} cannot be listed ({_first_line(e)})") from None
    if not files:
        raise NoFilesMatched(f"{flag} {pattern!r} matches no files")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class LineRange(NamedTuple):
    """Bytes ``[start, end)`` of one file: the lines that *begin* in it (``end`` None: to EOF)."""

    path: str
    start: int
    end: int | None


def split_file(path: str, size: int, split_bytes: int = DEFAULT_SPLIT_BYTES) -> list[LineRange]:
    """A file's line ranges of about ``split_bytes`` each; a compressed file is one range.

    >>> split_file("a.jsonl", 250, 100)
    [LineRange(path='a.jsonl', start=0, end=100), LineRange(path='a.jsonl', start=100, end=200), LineRange(path='a.jsonl', start=200, end=None)]
    >>> split_file("a.jsonl.gz", 250, 100)
    [LineRange(path='a.jsonl.gz', start=0, end=None)]
    """
    if split_bytes < 1:
        raise ValueError(f"split_bytes must be at least 1, got {split_bytes}")
    if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return [LineRange(path, 0, None)]
    starts = range(0, max(size, 1), split_bytes)
    return [LineRange(path, s, s + split_bytes) for s in starts[:-1]] + [
        LineRange(path, starts[-1], None)
    ]


def read_line_range(line_range: LineRange, batch_lines: int, block_bytes: int = READ_BLOCK_BYTES):
    """The lines that begin in ``line_range``, as bytes without their line ending, in lists of
    at most ``batch_lines``. The same lines ``ReadFromText`` gives (an empty line included,
    no extra one after a final newline, a ``\\r`` before a newline dropped), so every line
    belongs to exactly one range. Reads ``block_bytes`` at a time and splits in C."""
    path, start, end = line_range
    pending: list[bytes] = []
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        position = start
        if start > 0:
            # The line holding byte start - 1 belongs to the range before, unless that byte
            # ends it: either way the next line is the first to begin at or after start.
            f.seek(start - 1)
            position = start - 1 + len(f.readline())
        left = None if end is None else end - position  # bytes whose lines begin in the range
        tail = b""  # the start of a line whose end is not read yet
        while left is None or left > 0:
            block = f.read(block_bytes if left is None else min(block_bytes, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            buffer = tail + block
            lines = buffer.split(b"\n")
            tail = lines.pop()
            pending.extend(_without_cr(lines) if b"\r" in buffer else lines)
            pending = yield from _full_batches(pending, batch_lines)
        if tail:
            if left == 0:
                tail += f.readline()  # begun in the range: it is ours to its end
            pending.append(_strip_line_end(tail))
    pending = yield from _full_batches(pending, batch_lines)
    if pending:
        yield pending


def _full_batches(lines: list[bytes], batch_lines: int):
    """Yields the full batches of ``batch_lines`` lines and returns the lines left over."""
    full = len(lines) - len(lines) % batch_lines
    for i in range(0, full, batch_lines):
        yield lines[i : i + batch_lines]
    return lines[full:]


def _without_cr(lines: list[bytes]) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _strip_line_end(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


class _ReadLineRanges(beam.DoFn):
    def __init__(self, batch_lines: int):
        self._batch_lines = batch_lines

    def setup(self) -> None:
        self._lines = beam.metrics.Metrics.counter(READ_NAMESPACE, "lines")

    def process(self, line_range: LineRange):
        for batch in read_line_range(line_range, self._batch_lines):
            self._lines.inc(len(batch))
            yield batch


class NoFilesMatched(ValueError):
    """A file pattern that matches nothing."""


class ReadLineBatches(beam.PTransform):
    """The lines of text files as lists of up to ``batch_lines`` lines (``bytes``, line endings
    removed): for pipelines that work on batches anyway (bulk scoring), it skips the per-line
    cost of ``ReadFromText`` and a per-line step before ``BatchElements``.

    The pattern is matched when the pipeline is built (no match raises ``NoFilesMatched``), as
    ``ReadFromText`` validates it; the files are cut into ranges of ``split_bytes`` (a
    compressed file is one range) that ``Create`` spreads over workers, like
    ``ReadAllFromText``. Counts lines read as ``loopline.read.lines``. The ranges travel in the
    job graph (about 100 bytes each), so a pattern of tens of thousands of files would make a
    large Dataflow graph; merge small files first, or read them with ``ReadFromText``.

        >>> batches = p | ReadLineBatches("logs/decisions-*.jsonl", batch_lines=512)
    """

    def __init__(self, pattern: str, batch_lines: int, split_bytes: int = DEFAULT_SPLIT_BYTES):
        super().__init__()
        if batch_lines < 1:
            raise ValueError(f"batch_lines must be at least 1, got {batch_lines}")
        files = FileSystems.match([pattern])[0].metadata_list
        if not files:
            raise NoFilesMatched(f"no files match {pattern}")
        self._ranges = [
            line_range
            for f in sorted(files, key=lambda f: f.path)
            for line_range in split_file(f.path, f.size_in_bytes, split_bytes)
        ]
        self._batch_lines = batch_lines

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Ranges" >> beam.Create(self._ranges)
            | "ReadRanges" >> beam.ParDo(_ReadLineRanges(self._batch_lines))
        )
