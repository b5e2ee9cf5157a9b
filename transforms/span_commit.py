"""Atomic spans: a span directory holds exactly what its manifest lists, or has no manifest.

DESIGN.md: "when manifest.json exists, the directory holds exactly the files it lists". The
protocol, every step through Beam's ``FileSystems`` (so a span may be local or ``gs://``):

1. **claim** (``claim_span``): the writer writes its run id to ``SPAN/.loopline-claim``, then
   removes the old ``manifest.json`` (from here on readers see an incomplete span), then the old
   outputs (``examples/``, ``unmatched_observations/``, ``rejected/``) and temp debris
   (``beam-temp-*``, ``.temp*``, also other writers' temp files);
2. the job writes its files under ``.temp-<run id>/`` (in the span; for streaming in the output
   root), a hidden directory no reader globs (``examples/train/*.tfrecord.gz`` does not reach it);
3. **commit** (``commit_span``): if the claim still holds this run's id, remove any manifest and
   any file that is not this run's, rename the temp files to ``part-NNNNN-of-MMMMM<suffix>``,
   check the claim again, write ``manifest.json`` (under a temporary name, then renamed) listing
   every file with its record count, check the claim once more, and release it.

A second writer to the same span while one runs: the claim is last-writer-wins, so the writer
that claimed last commits and the other finds another run's id in the claim at its commit and
stops with ``SpanClaimLost`` (one line), having renamed nothing; its temp files are removed by
the winner's commit. The two can therefore not mix files. There is no compare-and-swap through
``FileSystems``, so this narrows the race rather than closing it: a writer that claims in the
milliseconds between the other's last claim check and its manifest rename deletes files that
manifest lists; it then removes that manifest when it commits itself (or, killed first, leaves
a span whose manifest and ``span_files`` disagree).

A batch job claims its span when it starts, before any file is written; a streaming job claims
each output window's span right before committing it (``transforms.span_layout``).

* Local disk: the claim is an ordinary file, overwritten in place; renames within the span are
  atomic (same filesystem), so a reader sees the manifest whole or not at all.
* GCS: the claim is an object; an object write is atomic (readers see the old or the new
  object, never a mix) and later writes win. A rename is copy + delete, so a commit's renames
  are not atomic, but they happen while no manifest exists; the manifest's own rename (a copy
  of a finished object) makes it appear whole.

A job killed at any point leaves either no manifest (it had not committed: the next run's claim
removes what it left) or a committed span whose manifest lists exactly its files (and perhaps a
stale claim, which the next writer simply overwrites).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import NamedTuple

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from transforms.manifest import MANIFEST, OUTPUTS
from transforms.span_files import JSON_LINES, TFRECORD_GZIP, open_span_file

CLAIM = ".loopline-claim"
TEMP_PREFIX = ".temp-"
# Debris of earlier writers at the top of a span: Beam file sinks' and our own temp files.
DEBRIS_PATTERNS = ("beam-temp-*", ".temp*")
# The format of each output, for the empty file an output with no records still gets.
_FORMATS = {"train": TFRECORD_GZIP, "eval": TFRECORD_GZIP}


class SpanClaimLost(RuntimeError):
    """Another run claimed the span after this one: this run committed nothing there."""


class TempFile(NamedTuple):
    """A file a writer finished under its temp directory, waiting for the commit."""

    output: str  # a key of transforms.manifest.OUTPUTS
    path: str
    records: int
    shard: int | None  # the shard index when the output has a fixed number of shards


def temp_dir(directory: str, run_id: str) -> str:
    """Where run ``run_id`` writes its files under ``directory`` before the commit."""
    return FileSystems.join(directory, TEMP_PREFIX + run_id)


def claimant(span_dir: str) -> str | None:
    """The run id in the span's claim, or None when there is no (readable) claim."""
    path = FileSystems.join(span_dir, CLAIM)
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read()).get("run_id")
    except (BeamIOError, OSError, ValueError, AttributeError):
        return None


def claim_span(span_dir: str, run_id: str) -> None:
    """Step 1: claim the span for ``run_id``, then remove its manifest, outputs and debris."""
    path = FileSystems.join(span_dir, CLAIM)
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(json.dumps({"run_id": run_id, "claimed_at_ms": int(time.time() * 1000)}).encode())
    _delete_quietly([FileSystems.join(span_dir, MANIFEST)])
    clear_outputs(span_dir, keep_prefix=temp_dir(span_dir, run_id))


def clear_outputs(span_dir: str, keep_prefix: str | None = None) -> None:
    """Removes every output file and temp debris of a span (not its manifest nor its claim)."""
    patterns = [FileSystems.join(span_dir, *directory, "**") for directory, _ in OUTPUTS.values()]
    patterns += [FileSystems.join(span_dir, debris, "**") for debris in DEBRIS_PATTERNS]
    patterns += [FileSystems.join(span_dir, debris) for debris in DEBRIS_PATTERNS]
    doomed = {
        m.path
        for result in FileSystems.match(patterns)
        for m in result.metadata_list
        if not (keep_prefix and m.path.startswith(keep_prefix))
    }
    _delete_quietly(sorted(doomed))


def remove_tree(directory: str) -> None:
    """Removes every file under ``directory`` and, where directories exist (local), itself."""
    files = [
        m.path for m in FileSystems.match([FileSystems.join(directory, "**")])[0].metadata_list
    ]
    _delete_quietly(files)
    _delete_quietly([directory])


def commit_span(
    span_dir: str,
    run_id: str,
    temp_files: Iterable[TempFile],
    num_shards: int | None,
    manifest_of: Callable[[dict[str, list[tuple[str, int]]]], dict],
) -> dict:
    """Step 3: moves ``temp_files`` into place and writes the manifest; returns it.

    ``manifest_of`` builds the manifest from the final ``(path, records)`` per output. Each
    output gets ``num_shards`` files (empty ones for shards no record went to), or at least one
    when ``num_shards`` is None. The claim is released once the manifest is written. Raises
    ``SpanClaimLost`` when another run holds the claim, also when that run's clearing made a
    step fail, after removing this run's temp files (they must not outlive it in a span the
    other run commits).
    """
    temps = list(temp_files)
    try:
        return _commit(span_dir, run_id, temps, num_shards, manifest_of)
    except (SpanClaimLost, BeamIOError, OSError) as e:
        if claimant(span_dir) == run_id:
            raise  # a failure of this run's own, not a lost claim
        _delete_quietly([temp.path for temp in temps])
        if isinstance(e, SpanClaimLost):
            raise
        _check_claim(span_dir, run_id)
        raise


def _commit(
    span_dir: str,
    run_id: str,
    temp_files: list[TempFile],
    num_shards: int | None,
    manifest_of: Callable[[dict[str, list[tuple[str, int]]]], dict],
) -> dict:
    _check_claim(span_dir, run_id)
    _delete_quietly([FileSystems.join(span_dir, MANIFEST)])
    clear_outputs(span_dir, keep_prefix=temp_dir(span_dir, run_id))
    by_output: dict[str, list[TempFile]] = {output: [] for output in OUTPUTS}
    for temp in temp_files:
        by_output[temp.output].append(temp)
    files: dict[str, list[tuple[str, int]]] = {}
    sources, destinations = [], []
    for output, temps in by_output.items():
        directory, suffix = OUTPUTS[output]
        if num_shards is None:
            ordered = sorted(temps, key=lambda t: t.path)
            total = max(1, len(ordered))
            placed = dict(enumerate(ordered))
        else:
            total = num_shards
            placed = {t.shard: t for t in temps}
        files[output] = []
        for shard in range(total):
            final = FileSystems.join(
                span_dir, *directory, f"part-{shard:05d}-of-{total:05d}{suffix}"
            )
            temp = placed.get(shard)
            if temp is None:
                _make_dirs(FileSystems.join(span_dir, *directory))
                open_span_file(final, _FORMATS.get(output, JSON_LINES)).close()
                files[output].append((final, 0))
            else:
                sources.append(temp.path)
                destinations.append(final)
                files[output].append((final, temp.records))
    for directory, _ in OUTPUTS.values():
        _make_dirs(FileSystems.join(span_dir, *directory))
    if sources:
        FileSystems.rename(sources, destinations)
    _check_claim(span_dir, run_id)
    manifest = manifest_of(files)
    manifest_path = FileSystems.join(span_dir, MANIFEST)
    write_json_atomically(manifest_path, manifest)
    if claimant(span_dir) != run_id:
        _delete_quietly([manifest_path])
        _check_claim(span_dir, run_id)
    _delete_quietly([FileSystems.join(span_dir, CLAIM)])
    return manifest


def _check_claim(span_dir: str, run_id: str) -> None:
    holder = claimant(span_dir)
    if holder != run_id:
        raise SpanClaimLost(
            f"span {span_dir} is claimed by run {holder or '(none)'}, not by this run {run_id}: "
            "another writer started on it after this one, so this run commits nothing there"
        )


def write_json_atomically(path: str, data: dict) -> None:
    """Writes JSON under a temporary name and renames it, so readers never see half a file."""
    # Named like temp debris, so a writer killed between create and rename leaves what the next
    # claim removes.
    directory, name = FileSystems.split(path)
    tmp = FileSystems.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    with FileSystems.create(tmp, mime_type="application/json") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    _delete_quietly([path])
    FileSystems.rename([tmp], [path])


def span_files(span_dir: str) -> list[str]:
    """Every file under a span except its manifest and claim: what a manifest must list."""
    ignored = {FileSystems.join(span_dir, MANIFEST), FileSystems.join(span_dir, CLAIM)}
    matched = FileSystems.match([FileSystems.join(span_dir, "**")])[0].metadata_list
    return sorted(m.path for m in matched if m.path not in ignored)


def _make_dirs(directory: str) -> None:
    """Creates a directory where the filesystem has them (local); GCS needs none."""
    if not FileSystems.exists(directory):
        try:
            FileSystems.mkdirs(directory)
        except (BeamIOError, OSError):
            if not FileSystems.exists(directory):
                raise


def _delete_quietly(paths: list[str]) -> None:
    """Deletes what exists of ``paths`` (another writer may have deleted some already)."""
    existing = [p for p in paths if FileSystems.exists(p)]
    if not existing:
        return
    try:
        FileSystems.delete(existing)
    except BeamIOError as e:
        still_there = [p for p in e.exception_details if FileSystems.exists(p)]
        if still_there:
            raise
