"""Finding the join's spans on disk (DESIGN.md, "Join outputs"), without Beam or TensorFlow.

A span is one join output: ``SPAN/examples/{train,eval}/*.tfrecord.gz`` plus ``SPAN/manifest.json``,
which the join writes last, so a span is complete exactly when its manifest exists. A dataset
root keeps spans by blueprint name and date, ``ROOT/<name>/<YYYY-MM-DD>/``, so users name data
by decision type and day rather than by path.

    >>> spans = find_spans("data", "notify", newest=2)  # the two newest complete spans
    >>> [s.date for s in spans]
    ['2026-11-01', '2026-11-02']
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "eval")
EXAMPLE_FILES = "*.tfrecord.gz"
MANIFEST = "manifest.json"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class SpanError(ValueError):
    """A span that cannot be trained on: missing, incomplete, or with an empty split."""


@dataclass(frozen=True)
class Span:
    """One complete join output: where it is, its date (if it sits under a dataset root) and
    its manifest."""

    path: Path
    manifest: dict = field(compare=False)
    date: str | None = None

    def split_files(self, split: str) -> list[Path]:
        """The example files of one split, sorted."""
        return sorted((self.path / "examples" / split).glob(EXAMPLE_FILES))

    def summary(self) -> dict:
        """What a model record says about a span: where, when, and the manifest's counts."""
        counts = {
            k: v
            for k, v in self.manifest.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return {"path": str(self.path), "date": self.date, "counts": counts}


def read_span(path: str | Path, date: str | None = None) -> Span:
    """Opens one span directory; raises SpanError saying what is missing.

    The checks are cheap (no example is parsed): the directory exists, its manifest exists and
    is JSON, and both splits hold at least one non-empty gzip TFRecord file.
    """
    path = Path(path)
    if not path.is_dir():
        raise SpanError(f"span {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise SpanError(
            f"span {path} is incomplete: it has no {MANIFEST} (the join writes it last, so the "
            "join is still running or failed)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpanError(f"span {path}: {MANIFEST} is not readable JSON ({e})") from None
    span = Span(path=path, manifest=manifest, date=date)
    for split in SPLITS:
        files = span.split_files(split)
        if not files:
            raise SpanError(
                f"span {path}: split '{split}' has no examples/{split}/{EXAMPLE_FILES} files"
            )
        if not any(_has_record(f) for f in files):
            raise SpanError(f"span {path}: split '{split}' is empty (its files hold no examples)")
    return span


def find_spans(root: str | Path, name: str, newest: int = 1) -> list[Span]:
    """The ``newest`` complete spans of blueprint ``name`` under ``root``, oldest first.

    Incomplete spans (no manifest yet) are passed over, so a join still writing today's span
    does not block training on yesterday's; raises SpanError when fewer than ``newest`` complete
    spans exist, or when one of the chosen spans has an empty split.
    """
    if newest < 1:
        raise SpanError(f"the number of spans must be at least 1, got {newest}")
    base = Path(root) / name
    if not base.is_dir():
        raise SpanError(f"no spans for '{name}': {base} does not exist")
    dated = sorted(p for p in base.iterdir() if p.is_dir() and _DATE.match(p.name))
    complete = [p for p in dated if (p / MANIFEST).exists()]
    if len(complete) < newest:
        incomplete = [p.name for p in dated if p not in complete]
        raise SpanError(
            f"asked for {newest} complete span(s) of '{name}' under {root}, found "
            f"{len(complete)}" + (f" (incomplete: {', '.join(incomplete)})" if incomplete else "")
        )
    return [read_span(p, date=p.name) for p in complete[-newest:]]


def _has_record(path: Path) -> bool:
    """Whether a gzip TFRecord file holds at least one record (its 8-byte length header)."""
    try:
        with gzip.open(path, "rb") as f:
            return len(f.read(8)) == 8
    except (OSError, EOFError):
        return False
