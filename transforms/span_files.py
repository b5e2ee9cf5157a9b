"""The files of a span: how records are framed, and writing one file through Beam FileSystems.

Two formats, named by what a span holds: gzip TFRecords of serialized tf.Examples
(``TFRECORD_GZIP``) and JSON lines (``JSON_LINES``). TFRecord framing is written here with public
APIs only (``struct`` and ``google_crc32c``, the C CRC32C that google-cloud-storage ships) into
a gzip handle from ``FileSystems.create``, so any Beam filesystem (local, ``gs://``) works and
TensorFlow's ``TFRecordDataset(..., compression_type="GZIP")`` reads the result.

    >>> with open_span_file("out/examples/train/x.tfrecord.gz", TFRECORD_GZIP) as f:
    ...     f.write(example.SerializeToString())
    >>> f.records
    1
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_MASK_DELTA = 0xA282EAD8
# Records are framed into a buffer and handed to the (gzip) handle about this many bytes at a
# time: one write per record would cost a Python call into the compressor each.
_BUFFER_BYTES = 1 << 20


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord: length, CRC of the length, the bytes, CRC of the bytes (little endian)."""
    length = struct.pack("<Q", len(record))
    return b"".join(
        (
            length,
            struct.pack("<I", masked_crc32c(length)),
            record,
            struct.pack("<I", masked_crc32c(record)),
        )
    )


def _json_line(line: str) -> bytes:
    return line.encode("utf-8") + b"\n"


class FileFormat(NamedTuple):
    """How a span's output is stored: file suffix, compression and how one record is framed."""

    suffix: str
    compression: str
    frame: Any  # Callable[[record], bytes]
    mime_type: str


TFRECORD_GZIP = FileFormat(
    ".tfrecord.gz", CompressionTypes.GZIP, tfrecord_frame, "application/octet-stream"
)
JSON_LINES = FileFormat(".jsonl", CompressionTypes.UNCOMPRESSED, _json_line, "application/x-ndjson")


class SpanFileWriter:
    """Writes records of one format to one new file; counts them in ``records``."""

    def __init__(self, path: str, file_format: FileFormat):
        self.path = path
        self.format = file_format
        self.records = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._handle = FileSystems.create(
            path, mime_type=file_format.mime_type, compression_type=file_format.compression
        )

    def write(self, record: Any) -> None:
        framed = self.format.frame(record)
        self._buffer.append(framed)
        self._buffered += len(framed)
        self.records += 1
        if self._buffered >= _BUFFER_BYTES:
            self._flush()

    def write_all(self, records: Any) -> None:
        for record in records:
            self.write(record)

    def _flush(self) -> None:
        if self._buffer:
            self._handle.write(b"".join(self._buffer))
            self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self._flush()
        self._handle.close()

    def __enter__(self) -> SpanFileWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_span_file(path: str, file_format: FileFormat) -> SpanFileWriter:
    """A writer of a new file at ``path`` (any Beam filesystem)."""
    return SpanFileWriter(path, file_format)
