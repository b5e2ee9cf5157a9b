"""Training reads only the example files a span's manifest lists (pipelines/train.py)."""

import json
from pathlib import Path

from loopline.spans import Span, read_span
from pipelines.train_examples import example_source
from transforms.span_files import TFRECORD_GZIP, open_span_file


def _write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_span_file(str(path), TFRECORD_GZIP) as f:
        f.write(b"one record")
    return path


def _span(root: Path, stray: bool) -> tuple[Span, list[Path]]:
    listed = [
        _write(root / "examples/train/part-00000-of-00001.tfrecord.gz"),
        _write(root / "examples/eval/part-00000-of-00001.tfrecord.gz"),
    ]
    if stray:  # e.g. left by an older writer with another shard count
        _write(root / "examples/train/part-00002-of-00003.tfrecord.gz")
    manifest = {"files": {"train": [str(listed[0])], "eval": [str(listed[1])]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return read_span(root), listed


def _read_files(input_base: str) -> list[Path]:
    return sorted(p.resolve() for p in Path(input_base).glob("examples/*/*.tfrecord.gz"))


def test_a_span_holding_just_its_listed_files_is_read_in_place(tmp_path):
    span, _ = _span(tmp_path / "span", stray=False)
    assert example_source([span], str(tmp_path / "root")).input_base == str(span.path)


def test_files_the_manifest_does_not_list_are_never_read(tmp_path):
    span, listed = _span(tmp_path / "span", stray=True)
    source = example_source([span], str(tmp_path / "root"))
    assert source.input_base != str(span.path)
    assert _read_files(source.input_base) == sorted(p.resolve() for p in listed)


def test_several_spans_are_staged_from_their_listings(tmp_path):
    first, listed_first = _span(tmp_path / "a", stray=True)
    second, listed_second = _span(tmp_path / "b", stray=False)
    source = example_source([first, second], str(tmp_path / "root"))
    expected = sorted(p.resolve() for p in listed_first + listed_second)
    assert _read_files(source.input_base) == expected
