"""Writing one output of a span to temp files, before the commit moves them into place.

``WriteSpanOutput`` writes records (serialized examples, JSON lines) under the run's temp
directory and returns a ``TempFile`` (path, record count, shard) per file: one file per bundle
when the runner chooses (batch, no shuffle), or exactly one per shard and window after a
``GroupByKey`` on a round-robin shard. The writers take the span's claim as a side input when
the layout gives one, so no file is written before the claim has cleared the span.

    >>> files = examples | WriteSpanOutput("train", TFRECORD_GZIP, temp_root, num_shards=2)
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window as beam_window

from loopline.events import format_event_time
from transforms.span_commit import TempFile
from transforms.span_files import FileFormat, open_span_file


def window_label(window: Any) -> str:
    """A window's start as a path segment: RFC 3339 without ':' ("global" for the global one)."""
    if isinstance(window, beam_window.GlobalWindow):
        return "global"
    return format_event_time(window.start.micros // 1000).replace(":", "")


def temp_path(temp_root: str, window: Any, output: str) -> str:
    return FileSystems.join(temp_root, window_label(window), output, uuid.uuid4().hex)


class WriteBundleFiles(beam.DoFn):
    """Batch without a shard count: one temp file per bundle (no shuffle), like Beam's sinks."""

    def __init__(self, output: str, temp_root: str, file_format: FileFormat):
        self.output = output
        self.temp_root = temp_root
        self.format = file_format

    def start_bundle(self) -> None:
        self._writer = None

    def process(self, record: Any, claim: Any = None) -> Iterable[Any]:
        if self._writer is None:
            path = temp_path(self.temp_root, beam_window.GlobalWindow(), self.output)
            self._writer = open_span_file(path, self.format)
        self._writer.write(record)
        return ()

    def finish_bundle(self) -> Iterable[Any]:
        if self._writer is not None:
            self._writer.close()
            temp = TempFile(self.output, self._writer.path, self._writer.records, None)
            self._writer = None
            yield beam_window.GlobalWindows.windowed_value(temp)


class AssignShard(beam.DoFn):
    """``(shard, record)`` round robin from a random start, so shards fill evenly."""

    def __init__(self, num_shards: int):
        self.num_shards = num_shards

    def start_bundle(self) -> None:
        self._next = random.randrange(self.num_shards)

    def process(self, record: Any) -> Iterable[tuple[int, Any]]:
        self._next = (self._next + 1) % self.num_shards
        yield self._next, record


class WriteShardFile(beam.DoFn):
    """One temp file per shard (and window) of a ``GroupByKey`` on the shard."""

    def __init__(self, output: str, temp_root: str, file_format: FileFormat):
        self.output = output
        self.temp_root = temp_root
        self.format = file_format

    def process(
        self,
        element: tuple[int, Iterable[Any]],
        window: Any = beam.DoFn.WindowParam,
        claim: Any = None,
    ) -> Iterable[TempFile]:
        shard, records = element
        with open_span_file(temp_path(self.temp_root, window, self.output), self.format) as f:
            f.write_all(records)
        yield TempFile(self.output, f.path, f.records, shard)


class WriteSpanOutput(beam.PTransform):
    """Records of one output -> ``TempFile``s under ``temp_root`` (see the module docstring).

    ``gate`` holds side inputs every writer waits for (``{"claim": AsSingleton(...)}``).
    """

    def __init__(
        self,
        output: str,
        file_format: FileFormat,
        temp_root: str,
        num_shards: int | None,
        gate: dict | None = None,
    ):
        super().__init__()
        self.output = output
        self.format = file_format
        self.temp_root = temp_root
        self.num_shards = num_shards
        self.gate = gate or {}

    def expand(self, records: Any) -> Any:
        if self.num_shards is None:
            return records | "WriteBundles" >> beam.ParDo(
                WriteBundleFiles(self.output, self.temp_root, self.format), **self.gate
            )
        return (
            records
            | "AssignShards" >> beam.ParDo(AssignShard(self.num_shards))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards"
            >> beam.ParDo(WriteShardFile(self.output, self.temp_root, self.format), **self.gate)
        )
