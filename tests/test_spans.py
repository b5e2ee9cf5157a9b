"""Span discovery under a dataset root (loopline/spans.py), on local files and on gs://.

Every discovery test runs twice (the ``storage_root`` fixture): on a local directory and on a
bucket of the in-process fake GCS (tests/fake_gcs.py), where there are no directories.
"""

import gzip
import json
import struct

import pytest

from loopline.spans import SpanError, find_spans, read_span
from tests.fake_gcs import root_for


@pytest.fixture(params=["local", "gs"])
def storage_root(request, tmp_path, monkeypatch):
    return root_for(request.param, tmp_path, monkeypatch)


def _record(payload: bytes) -> bytes:
    # TFRecord framing; the CRCs are not checked by span discovery.
    return struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4


def make_span(root, name, train=1, eval_=1, manifest=True) -> str:
    """Writes a span as ``name`` under ``root`` (a fake_gcs.Root); returns its path or URI."""
    path = root.local / name
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
    return root / name


def test_newest_complete_spans_are_chosen_oldest_first(storage_root):
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        make_span(storage_root, f"notify/{day}")
    spans = find_spans(storage_root.uri, "notify", newest=2)
    assert [s.date for s in spans] == ["2026-11-02", "2026-11-03"]


def test_incomplete_span_is_passed_over(storage_root):
    make_span(storage_root, "notify/2026-11-01")
    make_span(storage_root, "notify/2026-11-02")
    make_span(storage_root, "notify/2026-11-03", manifest=False)  # the join is still writing
    assert [s.date for s in find_spans(storage_root.uri, "notify")] == ["2026-11-02"]


def test_other_blueprints_and_stray_directories_are_ignored(storage_root):
    make_span(storage_root, "notify/2026-11-01")
    make_span(storage_root, "ranking/2026-11-05")
    (storage_root.local / "notify" / "tmp-staging").mkdir()
    assert [s.date for s in find_spans(storage_root.uri, "notify", newest=1)] == ["2026-11-01"]


def test_streaming_window_spans_are_found_in_time_order_with_daily_ones(storage_root):
    for name in ("2026-11-01", "2026-11-02T000000.000Z", "2026-11-02T120000.000Z"):
        make_span(storage_root, f"notify/{name}")
    make_span(storage_root, "notify/2026-11-02T12:00:00Z")  # not a window label: ignored
    spans = find_spans(storage_root.uri, "notify", newest=2)
    assert [s.date for s in spans] == ["2026-11-02T000000.000Z", "2026-11-02T120000.000Z"]


def test_too_few_complete_spans_is_an_error_naming_the_incomplete_ones(storage_root):
    make_span(storage_root, "notify/2026-11-01")
    make_span(storage_root, "notify/2026-11-02", manifest=False)
    with pytest.raises(
        SpanError, match=r"asked for 2 complete span.*found 1.*incomplete: 2026-11-02"
    ):
        find_spans(storage_root.uri, "notify", newest=2)


def test_unknown_blueprint_name_is_an_error(storage_root):
    with pytest.raises(SpanError, match="no spans for 'notify'"):
        find_spans(storage_root.uri, "notify")


def test_missing_span_directory_is_an_error(storage_root):
    with pytest.raises(SpanError, match="does not exist"):
        read_span(storage_root / "nowhere")


def test_span_without_manifest_is_incomplete(storage_root):
    span = make_span(storage_root, "out", manifest=False)
    with pytest.raises(SpanError, match="incomplete: it has no manifest.json"):
        read_span(span)


def test_empty_split_is_an_error(storage_root):
    span = make_span(storage_root, "out", train=3, eval_=0)
    with pytest.raises(SpanError, match="split 'eval' is empty"):
        read_span(span)


def test_split_without_files_is_an_error(storage_root):
    span = make_span(storage_root, "out")
    for f in (storage_root.local / "out" / "examples" / "train").iterdir():
        f.unlink()
    with pytest.raises(SpanError, match="split 'train' has no examples/train"):
        read_span(span)


def test_summary_carries_the_manifest_counts(storage_root):
    span = read_span(
        make_span(storage_root, "notify/2026-11-01", train=2, eval_=1), date="2026-11-01"
    )
    summary = span.summary()
    assert summary["date"] == "2026-11-01"
    assert summary["counts"] == {"examples_written": 3}  # booleans and mappings left out
    assert span.example_files("train") == [
        storage_root / "notify/2026-11-01/examples/train/part-00000-of-00001.tfrecord.gz"
    ]


def test_local_span_has_a_local_path_and_a_remote_one_does_not(storage_root):
    span = read_span(make_span(storage_root, "out"))
    if storage_root.uri.startswith("gs://"):
        with pytest.raises(SpanError, match="not on the local filesystem"):
            span.split_files("train")
    else:
        assert span.path == storage_root.local / "out"
        assert [f.name for f in span.split_files("train")] == ["part-00000-of-00001.tfrecord.gz"]
