"""Span discovery under a dataset root (loopline/spans.py): plain files, no Beam, no TensorFlow."""

import gzip
import json
import struct

import pytest

from loopline.spans import SpanError, find_spans, read_span


def _record(payload: bytes) -> bytes:
    # TFRecord framing; the CRCs are not checked by span discovery.
    return struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4


def make_span(path, train=1, eval_=1, manifest=True):
    for split, n in (("train", train), ("eval", eval_)):
        directory = path / "examples" / split
        directory.mkdir(parents=True, exist_ok=True)
        with gzip.open(directory / "part-00000-of-00001.tfrecord.gz", "wb") as f:
            for i in range(n):
                f.write(_record(f"example-{i}".encode()))
    if manifest:
        (path / "manifest.json").write_text(
            json.dumps({"examples_written": train + eval_, "reconciles": True, "blueprint": {}})
        )
    return path


def test_newest_complete_spans_are_chosen_oldest_first(tmp_path):
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        make_span(tmp_path / "notify" / day)
    spans = find_spans(tmp_path, "notify", newest=2)
    assert [s.date for s in spans] == ["2026-11-02", "2026-11-03"]


def test_incomplete_span_is_passed_over(tmp_path):
    make_span(tmp_path / "notify" / "2026-11-01")
    make_span(tmp_path / "notify" / "2026-11-02")
    make_span(tmp_path / "notify" / "2026-11-03", manifest=False)  # the join is still writing
    assert [s.date for s in find_spans(tmp_path, "notify")] == ["2026-11-02"]


def test_other_blueprints_and_stray_directories_are_ignored(tmp_path):
    make_span(tmp_path / "notify" / "2026-11-01")
    make_span(tmp_path / "ranking" / "2026-11-05")
    (tmp_path / "notify" / "tmp-staging").mkdir()
    assert [s.date for s in find_spans(tmp_path, "notify", newest=1)] == ["2026-11-01"]


def test_too_few_complete_spans_is_an_error_naming_the_incomplete_ones(tmp_path):
    make_span(tmp_path / "notify" / "2026-11-01")
    make_span(tmp_path / "notify" / "2026-11-02", manifest=False)
    with pytest.raises(
        SpanError, match=r"asked for 2 complete span.*found 1.*incomplete: 2026-11-02"
    ):
        find_spans(tmp_path, "notify", newest=2)


def test_unknown_blueprint_name_is_an_error(tmp_path):
    with pytest.raises(SpanError, match="no spans for 'notify'"):
        find_spans(tmp_path, "notify")


def test_missing_span_directory_is_an_error(tmp_path):
    with pytest.raises(SpanError, match="does not exist"):
        read_span(tmp_path / "nowhere")


def test_span_without_manifest_is_incomplete(tmp_path):
    span = make_span(tmp_path / "out", manifest=False)
    with pytest.raises(SpanError, match="incomplete: it has no manifest.json"):
        read_span(span)


def test_empty_split_is_an_error(tmp_path):
    span = make_span(tmp_path / "out", train=3, eval_=0)
    with pytest.raises(SpanError, match="split 'eval' is empty"):
        read_span(span)


def test_split_without_files_is_an_error(tmp_path):
    span = make_span(tmp_path / "out")
    for f in (span / "examples" / "train").iterdir():
        f.unlink()
    with pytest.raises(SpanError, match="split 'train' has no examples/train"):
        read_span(span)


def test_summary_carries_the_manifest_counts(tmp_path):
    span = read_span(
        make_span(tmp_path / "notify" / "2026-11-01", train=2, eval_=1), date="2026-11-01"
    )
    summary = span.summary()
    assert summary["date"] == "2026-11-01"
    assert summary["counts"] == {"examples_written": 3}  # booleans and mappings left out
    assert [f.name for f in span.split_files("train")] == ["part-00000-of-00001.tfrecord.gz"]
