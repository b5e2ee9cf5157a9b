"""The manifest of a span (DESIGN.md, "Join outputs"): its counts, identities and file list.

Pure: no Beam, no I/O. ``build_manifest`` turns merged ``SpanStats`` and the list of written
files into the ``manifest.json`` dict; every count name, reconciliation identity and counter
name of a span is defined here once, and readers (the entry point's summary, the tests) take
them from here.

    >>> manifest = build_manifest(stats, blueprint, 0, {"train": [("…/part-00000-of-00001.tfrecord.gz", 12)]})
    >>> manifest["reconciles"], manifest["examples_written"]
    (True, 12)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopline.blueprint import Blueprint, format_duration
from loopline.events import format_event_time

if TYPE_CHECKING:
    from transforms.span_stats import SpanStats

MANIFEST = "manifest.json"
DAY_MS = 86_400_000
# Multiples of the label window the manifest prices (plus one day): what the window choice costs.
ALTERNATIVE_WINDOW_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)

# The span's outputs: manifest "files" key -> (directory under the span, file suffix).
OUTPUTS = {
    "train": (("examples", "train"), ".tfrecord.gz"),
    "eval": (("examples", "eval"), ".tfrecord.gz"),
    "unmatched_observations": (("unmatched_observations",), ".jsonl"),
    "rejected": (("rejected",), ".jsonl"),
    "late": (("late",), ".jsonl"),
}

# What each input count is the sum of when nothing lost an event (DESIGN.md's identities).
INPUT_PARTS = {
    "decisions_in": (
        "examples_written",
        "duplicate_decisions",
        "rejected_decisions",
        "late_decisions",
    ),
    "observations_in": (
        "observations_used",
        "observations_out_of_window",
        "observations_orphan",
        "observations_late",
        "observations_out_of_range",
        "duplicate_observations",
        "rejected_observations",
        "late_observations",
    ),
}
# reconciliation check -> (total, the counts it must equal the sum of)
IDENTITIES = {
    "decisions": ("decisions_in", INPUT_PARTS["decisions_in"]),
    "examples": ("examples_written", ("examples_observed", "examples_default")),
    "observations": ("observations_in", INPUT_PARTS["observations_in"]),
    "split": ("examples_written", ("examples_train", "examples_eval")),
}
# The manifest's counts, in DESIGN.md's order (top-level keys of manifest.json).
COUNT_NAMES = (
    "decisions_in",
    "examples_written",
    "examples_observed",
    "examples_default",
    "duplicate_decisions",
    "rejected_decisions",
    "late_decisions",
    "observations_in",
    "observations_used",
    "observations_out_of_window",
    "observations_orphan",
    "observations_late",
    "observations_out_of_range",
    "duplicate_observations",
    "rejected_observations",
    "late_observations",
    "examples_train",
    "examples_eval",
)
# The count of each reason an observation lands in unmatched_observations/ (DESIGN.md, "Join
# semantics"; late_observation only in streaming, for a decision already emitted).
UNMATCHED_COUNTS = {
    "orphan": "observations_orphan",
    "out_of_window": "observations_out_of_window",
    "late_observation": "observations_late",
}
# Counts of elements the accounting does not know (a join status or unmatched reason that is
# neither of DESIGN.md's): any of them makes the span fail reconciliation.
UNKNOWN_KINDS = ("unknown_join_status", "unknown_unmatched_reason")

# Beam counters of the span writer: namespace and names.
COUNTER_NAMESPACE = "loopline.write_span"
EXAMPLES_TRAIN_COUNTER = "examples_train"
EXAMPLES_EVAL_COUNTER = "examples_eval"
MANIFESTS_WRITTEN_COUNTER = "manifests_written"
LATE_JOIN_OUTPUTS_COUNTER = "late_join_outputs"


def alternative_windows_ms(blueprint: Blueprint) -> tuple[int, ...]:
    """The label windows the manifest prices: multiples of the blueprint's, and one day."""
    windows = {max(1, int(blueprint.label.window_ms * f)) for f in ALTERNATIVE_WINDOW_FACTORS}
    windows.add(DAY_MS)
    return tuple(sorted(windows))


def span_counts(stats: SpanStats, counted_inputs: frozenset[str] = frozenset()) -> dict:
    """The manifest's counts; an input count not in ``counted_inputs`` is the sum of its parts."""
    c = stats.counts
    counts = {name: c[name] for name in COUNT_NAMES}
    for name, parts in INPUT_PARTS.items():
        if name not in counted_inputs:
            counts[name] = sum(counts[p] for p in parts)
    return counts


def reconciliation(counts: dict, stats: SpanStats) -> dict[str, bool]:
    """Each identity of ``IDENTITIES`` (and that every element was of a known kind) checked."""
    checks = {
        name: counts[total] == sum(counts[p] for p in parts)
        for name, (total, parts) in IDENTITIES.items()
    }
    checks["known_kinds"] = not any(stats.counts[k] for k in UNKNOWN_KINDS)
    return checks


def build_manifest(
    stats: SpanStats,
    blueprint: Blueprint,
    allowed_lateness_ms: int,
    files: dict[str, list[tuple[str, int]]],
    counted_inputs: frozenset[str] = frozenset(),
    observation_range: tuple[int | None, int | None] = (None, None),
) -> dict:
    """The manifest of DESIGN.md from merged span stats and the written ``(path, records)``.

    ``counted_inputs`` names the input counts (``decisions_in``, ``observations_in``) that were
    counted from what was read; the others are the sums of their parts, so they reconcile by
    construction. ``files`` lists every file of the span by output; the manifest keeps the
    paths under ``files`` and each file's record count under ``records_per_file``.
    ``observation_range`` is the span's own observation range ``[from, until)`` in epoch ms
    (None: open), recorded under ``observation_range``; observations outside it with no
    decision in the span are ``observations_out_of_range``.
    """
    counts = span_counts(stats, counted_inputs)
    checks = reconciliation(counts, stats)
    label = blueprint.label
    windows = []
    for window_ms in alternative_windows_ms(blueprint):
        within = stats.offsets_within[window_ms]
        windows.append(
            {
                "window": format_duration(window_ms),
                "window_ms": window_ms,
                "observations_counted": within,
                "share_counted": within / stats.offsets_total if stats.offsets_total else None,
                "is_label_window": window_ms == label.window_ms,
            }
        )
    listed = {kind: sorted(files.get(kind, ())) for kind in OUTPUTS}
    return {
        "blueprint": blueprint.summary(),
        **counts,
        "rejected_by_reason": {
            s: dict(sorted(r.items())) for s, r in sorted(stats.rejected.items())
        },
        "reconciles": all(checks.values()),
        "reconciliation": checks,
        "window": {
            "label_window": format_duration(label.window_ms),
            "label_window_ms": label.window_ms,
            "backward_slack": format_duration(label.backward_slack_ms),
            "backward_slack_ms": label.backward_slack_ms,
            "allowed_lateness": format_duration(allowed_lateness_ms),
            "allowed_lateness_ms": allowed_lateness_ms,
            "aggregation": label.aggregation,
            "label_default": label.default,
            "eval_fraction": blueprint.eval_fraction,
        },
        "observation_range": {
            "from": _instant(observation_range[0]),
            "until": _instant(observation_range[1]),
        },
        "event_time_range": {
            "min": _instant(stats.min_time_ms),
            "max": _instant(stats.max_time_ms),
        },
        "label_delay": stats.delay_quantiles(),
        "alternative_windows": {
            "observations_of_known_decisions": stats.offsets_total,
            "windows": windows,
        },
        "files": {kind: [path for path, _ in entries] for kind, entries in listed.items()},
        "records_per_file": {
            path: records for entries in listed.values() for path, records in entries
        },
    }


def _instant(ms: int | None) -> str | None:
    return None if ms is None else format_event_time(ms)


def listed_files(manifest: dict[str, Any]) -> list[str]:
    """Every file a manifest lists, sorted."""
    return sorted(path for paths in manifest.get("files", {}).values() for path in paths)
