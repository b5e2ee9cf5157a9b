"""transforms.sources: ReadLineBatches gives every line of every file exactly once, as
ReadFromText reads it, whatever the split points and batch sizes; ReadEvents reads each source
the same way one input or a batch at a time."""

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.sources import (
    LineRange,
    NoFilesMatched,
    ReadEvents,
    ReadLineBatches,
    bigquery_row_to_record,
    read_line_range,
    split_file,
)

# Line content: anything but a newline, with carriage returns and empty lines likely.
LINE = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"x")) | st.sampled_from(
    [b"", b"\r", b"{}", b'{"a": 1}\r']
)


def _expected_lines(content: bytes) -> list[bytes]:
    """ReadFromText's lines: split on \\n, one \\r before it dropped, no line after a final
    \\n; a last line without \\n keeps a trailing \\r."""
    if not content:
        return []
    *ended, last = content.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in ended]
    return lines + [last] if last else lines


@settings(max_examples=500, deadline=None)
@given(
    lines=st.lists(LINE, max_size=30),
    final_newline=st.booleans(),
    split_bytes=st.integers(1, 40),
    batch_lines=st.integers(1, 7),
    block_bytes=st.integers(1, 16) | st.just(1 << 20),
)
def test_ranges_give_every_line_once_in_order_in_bounded_batches(
    tmp_path_factory, lines, final_newline, split_bytes, batch_lines, block_bytes
):
    content = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("lines") / "f.jsonl"
    path.write_bytes(content)

    batches = [
        batch
        for line_range in split_file(str(path), len(content), split_bytes)
        for batch in read_line_range(line_range, batch_lines, block_bytes)
    ]

    assert [line for batch in batches for line in batch] == _expected_lines(content)
    assert all(1 <= len(batch) <= batch_lines for batch in batches)


def test_split_file_covers_the_file_and_keeps_compressed_files_whole():
    ranges = split_file("a.jsonl", 250, 100)
    assert [(r.start, r.end) for r in ranges] == [(0, 100), (100, 200), (200, None)]
    assert split_file("a.jsonl", 0, 100) == [LineRange("a.jsonl", 0, None)]
    assert split_file("a.jsonl.gz", 10_000, 100) == [LineRange("a.jsonl.gz", 0, None)]
    with pytest.raises(ValueError, match="split_bytes"):
        split_file("a.jsonl", 10, 0)


def test_pipeline_reads_what_read_from_text_reads_across_files_and_gzip(tmp_path: Path):
    (tmp_path / "a.jsonl").write_bytes(b"".join(b'{"n": %d}\r\n' % i for i in range(300)))
    (tmp_path / "b.jsonl").write_bytes(b"first\n\nlast-without-newline")
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b"".join(b"zipped %d\n" % i for i in range(50)))
    pattern = str(tmp_path / "*.jsonl*")

    expected = [
        *(f'{{"n": {i}}}' for i in range(300)),
        *("first", "", "last-without-newline"),
        *(f"zipped {i}" for i in range(50)),
    ]

    with TestPipeline() as p:
        batches = p | "Batches" >> ReadLineBatches(pattern, batch_lines=16, split_bytes=512)
        lines = batches | beam.FlatMap(lambda batch: [line.decode() for line in batch])
        assert_that(lines, equal_to(expected))
        reference = p | beam.io.ReadFromText(pattern)
        assert_that(reference, equal_to(expected), label="ReadFromTextReadsTheSame")
        assert_that(
            batches | beam.Map(len) | beam.CombineGlobally(max),
            equal_to([16]),
            label="BatchesAtMost16",
        )


def test_a_pattern_that_matches_nothing_fails_when_the_pipeline_is_built(tmp_path: Path):
    with pytest.raises(NoFilesMatched, match="no files match"):
        ReadLineBatches(str(tmp_path / "missing-*.jsonl"), batch_lines=8)
    with pytest.raises(ValueError, match="batch_lines"):
        ReadLineBatches(str(tmp_path / "*"), batch_lines=0)


# --- ReadEvents: files as bytes, and a pattern that matches nothing -------------------------


@pytest.mark.parametrize(
    "kind, flag", [("decision", "--decisions"), ("observation", "--observations")]
)
def test_read_events_with_a_pattern_that_matches_nothing_fails_when_the_pipeline_is_built(
    tmp_path: Path, kind, flag
):
    pattern = str(tmp_path / "missing-*.jsonl")
    source = ReadEvents(kind, pattern=pattern)
    with pytest.raises(NoFilesMatched) as raised:
        _ = beam.Pipeline() | source
    message = str(raised.value)
    assert message == f"{flag} {pattern!r} matches no files" and "\n" not in message


def test_read_events_validate_false_matches_nothing_until_run(tmp_path: Path):
    source = ReadEvents("decision", pattern=str(tmp_path / "later-*.avro"), validate=False)
    _ = beam.Pipeline() | source
    assert source.parse_format == "avro"


def test_read_events_gives_lines_as_bytes_so_bad_utf8_reaches_the_parser(tmp_path: Path):
    good = b'{"a": 1}'
    (tmp_path / "events-1.jsonl").write_bytes(good + b"\n\xff\xfe{bad}\r\n\xef\xbb\xbf{}\n")
    (tmp_path / "events-2.jsonl").write_bytes(b"caf\xc3\xa9\n\x80")
    with TestPipeline() as p:
        lines = p | ReadEvents("decision", pattern=str(tmp_path / "events-*.jsonl"))
        assert_that(
            lines,
            equal_to([good, b"\xff\xfe{bad}", b"\xef\xbb\xbf{}", "café".encode(), b"\x80"]),
        )


def test_a_bigquery_json_column_too_deep_to_read_is_left_for_the_parser_to_refuse():
    deep = "[" * 100_000 + "]" * 100_000
    record = bigquery_row_to_record({"decision_id": "d1", "features": deep, "observations": "{}"})
    assert record == {"decision_id": "d1", "features": deep, "observations": {}}


# --- ReadEvents with batching: the same inputs, a batch at a time --------------------------


def _write_inputs(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as JSON lines (two files), Avro and TFRecord files: a pattern per format."""
    import fastavro
    import tensorflow as tf

    lines = [json.dumps(row).encode() for row in rows]
    (tmp_path / "d-1.jsonl").write_bytes(b"\n".join(lines[:7]) + b"\n")
    (tmp_path / "d-2.jsonl").write_bytes(b"\n".join(lines[7:]))
    schema = {
        "type": "record",
        "name": "Row",
        "fields": [{"name": "decision_id", "type": "string"}, {"name": "n", "type": "long"}],
    }
    with open(tmp_path / "d.avro", "wb") as f:
        fastavro.writer(f, schema, rows)
    with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as writer:
        for line in lines:
            writer.write(line)
    return {
        "json": str(tmp_path / "d-*.jsonl"),
        "avro": str(tmp_path / "d.avro"),
        "tfrecord": str(tmp_path / "d.tfrecord"),
    }


@pytest.mark.parametrize("fmt", ["json", "avro", "tfrecord"])
@pytest.mark.parametrize(
    "batching",
    [
        {"min_batch_size": 4, "max_batch_size": 6},
        {"min_batch_size": 3, "max_batch_size": 5, "max_batch_duration_secs": 60},
    ],
    ids=["by-size", "stateful"],
)
def test_batched_read_events_gives_every_input_once_in_bounded_batches(tmp_path, fmt, batching):
    rows = [{"decision_id": f"d-{i}", "n": i} for i in range(23)]
    pattern = _write_inputs(tmp_path, rows)[fmt]
    source = ReadEvents("decision", pattern=pattern, batching=batching)
    assert source.parse_format == ReadEvents("decision", pattern=pattern).parse_format == fmt
    expected = rows if fmt == "avro" else [json.dumps(row).encode() for row in rows]

    def bounded(sizes):
        assert sum(sizes) == len(rows) and max(sizes) <= batching["max_batch_size"], sizes

    with TestPipeline() as p:
        batches = p | source
        assert_that(batches | beam.FlatMap(lambda batch: batch), equal_to(expected))
        assert_that(batches | beam.Map(len), bounded, label="Bounded")


def test_batched_read_events_decodes_bigquery_rows_like_the_unbatched_read(monkeypatch):
    """The BigQuery branch (ReadFromBigQuery replaced by Create: no emulator takes Beam's
    export) decodes TIMESTAMP and JSON columns the same way batched or not."""
    when = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    row = {"decision_id": "d-1", "event_time": when, "features": '{"country": "PT"}'}
    monkeypatch.setattr(
        beam.io, "ReadFromBigQuery", lambda table, **kwargs: beam.Create([row, dict(row)])
    )
    record = bigquery_row_to_record(row)
    assert record["event_time"] == int(when.timestamp() * 1000)
    with TestPipeline() as p:
        one_by_one = p | "OneByOne" >> ReadEvents("decision", table="p:d.t")
        batched = p | "Batched" >> ReadEvents("decision", table="p:d.t", batching={})
        assert_that(one_by_one, equal_to([record, record]))
        assert_that(
            batched | beam.FlatMap(lambda batch: batch), equal_to([record, record]), label="B"
        )


def test_read_events_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="Pub/Sub is read event by event"):
        ReadEvents("decision", subscription="projects/p/subscriptions/s", batching={})
    with pytest.raises(ValueError, match="TFRecord examples are decisions, not observations"):
        ReadEvents("observation", pattern="spans/*.tfrecord.gz")
    with pytest.raises(ValueError, match="format must be one of auto, json, avro, tfrecord"):
        ReadEvents("decision", pattern="d.parquet", format="parquet")
