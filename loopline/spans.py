"""Finding the join's spans (DESIGN.md, "Join outputs") on any filesystem, without TensorFlow.

A span is one join output: ``SPAN/examples/{train,eval}/*.tfrecord.gz`` plus ``SPAN/manifest.json``,
which the join writes last, so a span is complete exactly when its manifest exists. A dataset
root keeps spans by blueprint name and date, ``ROOT/<name>/<YYYY-MM-DD>/``, so users name data
by decision type and day rather than by path; a streaming join writing to ``ROOT/<name>`` adds
one span per output window, ``ROOT/<name>/<YYYY-MM-DDTHHMMSS.sssZ>/``, found the same way. The root may be local or ``gs://`` (the daily
DAG's bucket): everything goes through ``loopline.storage``.

    >>> spans = find_spans("gs://b/data", "notify", newest=2)  # the two newest complete spans
    >>> [s.date for s in spans]
    ['2026-11-01', '2026-11-02']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loopline import storage

SPLITS = ("train", "eval")
EXAMPLE_FILES = "*.tfrecord.gz"
MANIFEST = "manifest.json"
# A batch span is named by its day; a streaming job's span by its output window's start
# (RFC 3339 without ':', e.g. 2026-11-01T120000.000Z). Both sort by time as strings.
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{6}\.\d{3}Z)?$")


class SpanError(ValueError):
    """A span that cannot be trained on: missing, incomplete, or with an empty split."""


@dataclass(frozen=True)
class Span:
    """One complete join output: where it is (a local path or a URI such as ``gs://...``), its
    date (if it sits under a dataset root) and its manifest."""

    uri: str
    manifest: dict = field(compare=False)
    date: str | None = None

    def example_files(self, split: str) -> list[str]:
        """The example files of one split, sorted, as paths or URIs like ``uri``."""
        return storage.glob(storage.join(self.uri, "examples", split, EXAMPLE_FILES))

    @property
    def path(self) -> Path:
        """The span's local directory (for code that needs the local filesystem, such as
        pipelines.train's symlink staging); a remote span has none."""
        return self._local()

    def split_files(self, split: str) -> list[Path]:
        """``example_files`` of a local span as ``Path``s (see ``path``)."""
        self._local()
        return [Path(f) for f in self.example_files(split)]

    def _local(self) -> Path:
        if storage.is_remote(self.uri):
            raise SpanError(f"span {self.uri} is not on the local filesystem")
        return Path(self.uri)

    def summary(self) -> dict:
        """What a model record says about a span: where, when, and the manifest's counts."""
        counts = {
            k: v
            for k, v in self.manifest.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return {"path": self.uri, "date": self.date, "counts": counts}


def read_span(path: str | Path, date: str | None = None) -> Span:
    """Opens one span directory (local or remote); raises SpanError saying what is missing.

    The checks are cheap (no example is parsed): the directory exists, its manifest exists and
    is JSON, and both splits hold at least one non-empty gzip TFRecord file.
    """
    uri = str(path).rstrip("/")
    if not storage.is_dir(uri):
        raise SpanError(f"span {uri} does not exist")
    manifest_path = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_path):
        raise SpanError(
            f"span {uri} is incomplete: it has no {MANIFEST} (the join writes it last, so the "
            "join is still running or failed)"
        )
    try:
        manifest = storage.read_json(manifest_path)
    except storage.StorageError as e:
        raise SpanError(f"span {uri}: {MANIFEST} is not readable JSON ({e})") from None
    span = Span(uri=uri, manifest=manifest, date=date)
    for split in SPLITS:
        files = span.example_files(split)
        if not files:
            raise SpanError(
                f"span {uri}: split '{split}' has no examples/{split}/{EXAMPLE_FILES} files"
            )
        if not any(_has_record(f) for f in files):
            raise SpanError(f"span {uri}: split '{split}' is empty (its files hold no examples)")
    return span


def find_spans(root: str | Path, name: str, newest: int = 1) -> list[Span]:
    """The ``newest`` complete spans of blueprint ``name`` under ``root``, oldest first.

    Incomplete spans (no manifest yet) are passed over, so a join still writing today's span
    does not block training on yesterday's; raises SpanError when fewer than ``newest`` complete
    spans exist, or when one of the chosen spans has an empty split.
    """
    if newest < 1:
        raise SpanError(f"the number of spans must be at least 1, got {newest}")
    base = storage.join(str(root), name)
    if not storage.is_dir(base):
        raise SpanError(f"no spans for '{name}': {base} does not exist")
    # One listing of everything under the base: a date directory is known by the files it
    # holds (an object store has no empty directories), complete when one is its manifest.
    files_by_day: dict[str, set[str]] = {}
    for f in storage.glob(storage.join(base, "**")):
        day, _, rest = f[len(base) :].lstrip("/").partition("/")
        if _DATE.match(day) and rest:
            files_by_day.setdefault(day, set()).add(rest)
    dated = sorted(files_by_day)
    complete = [day for day in dated if MANIFEST in files_by_day[day]]
    if len(complete) < newest:
        incomplete = [day for day in dated if day not in complete]
        raise SpanError(
            f"asked for {newest} complete span(s) of '{name}' under {root}, found "
            f"{len(complete)}" + (f" (incomplete: {', '.join(incomplete)})" if incomplete else "")
        )
    return [read_span(storage.join(base, day), date=day) for day in complete[-newest:]]


def _has_record(path: str) -> bool:
    """Whether a gzip TFRecord file holds at least one record (its 8-byte length header)."""
    try:
        with storage.open_read(path, compressed=True) as f:
            return len(f.read(8)) == 8
    except (OSError, EOFError):
        return False
