"""Writing one join output (a span) with its accounting (DESIGN.md, "Join outputs").

``WriteSpan`` takes everything the parse and join steps produced and writes:

    OUTPUT/examples/train/*.tfrecord.gz      gzip tf.Example, split by a stable hash of decision_id
    OUTPUT/examples/eval/*.tfrecord.gz
    OUTPUT/unmatched_observations/*.jsonl    {"reason": "orphan"|"out_of_window", "event": {...}}
    OUTPUT/rejected/*.jsonl                  {"reason", "detail", "source", "payload"}
    OUTPUT/manifest.json                     written after every other file is final

The counts of the manifest are computed inside the pipeline (one combine per output), never by
reading files back, and the manifest says whether they reconcile.

    >>> parsed_decisions = raw_decisions | ParseDecisions(blueprint)
    >>> parsed_observations = raw_observations | ParseObservations(blueprint)
    >>> join = (parsed_decisions.events, parsed_observations.events) | JoinDecisions(blueprint)
    >>> SpanInputs.from_join(join, parsed_decisions.rejected, parsed_observations.rejected,
    ...                      raw_decisions, raw_observations) | WriteSpan("out/", blueprint, key)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window
from apache_beam.utils.windowed_value import PaneInfoTiming

from loopline.blueprint import Blueprint, format_duration
from loopline.events import Refusal, format_event_time
from transforms.examples import PiiKeyMissing, joined_to_example
from transforms.join import (
    DEFAULT,
    OBSERVED,
    ORPHAN,
    OUT_OF_WINDOW,
    JoinedDecision,
    JoinOutputs,
    session_gap_ms,
)

TRAIN = "train"
EVAL = "eval"
MANIFEST = "manifest.json"
EXAMPLES_SUFFIX = ".tfrecord.gz"
JSONL_SUFFIX = ".jsonl"
DAY_MS = 86_400_000
# Multiples of the label window the manifest prices (plus one day): what the window choice costs.
ALTERNATIVE_WINDOW_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The manifest's counts, in DESIGN.md's order (top-level keys of manifest.json).
COUNT_NAMES = (
    "decisions_in",
    "examples_written",
    "examples_observed",
    "examples_default",
    "duplicate_decisions",
    "rejected_decisions",
    "observations_in",
    "observations_used",
    "observations_out_of_window",
    "observations_orphan",
    "duplicate_observations",
    "rejected_observations",
    "examples_train",
    "examples_eval",
)
# Distinct label delays kept exactly; beyond it delays are kept to the second.
_EXACT_DELAYS = 100_000


def is_eval(decision_id: str, eval_fraction: float) -> bool:
    """Whether a decision belongs to the eval split: stable across runs, machines and runners.

    The first 8 bytes of SHA-256 of the id, as a fraction of 2**64, below ``eval_fraction``.

    >>> is_eval("d-123", 0.0), is_eval("d-123", 0.999999)
    (False, True)
    """
    digest = hashlib.sha256(decision_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


class SpanInputs(NamedTuple):
    """Every PCollection a span accounts for.

    ``raw_decisions`` / ``raw_observations`` (what was read, before parsing) are optional: given,
    ``decisions_in`` / ``observations_in`` are counted from them, so the manifest's reconciliation
    is a real check that nothing was lost between reading and writing; absent, they are the sum
    of the outputs.
    """

    joined: Any  # PCollection[JoinedDecision]
    unmatched: Any  # PCollection[UnmatchedObservation]
    duplicate_decisions: Any  # PCollection[DecisionEvent]
    duplicate_observations: Any  # PCollection[ObservationEvent]
    rejected_decisions: Any  # PCollection[Refusal]
    rejected_observations: Any  # PCollection[Refusal]
    raw_decisions: Any = None
    raw_observations: Any = None

    @classmethod
    def from_join(
        cls,
        join: JoinOutputs,
        rejected_decisions: Any,
        rejected_observations: Any,
        raw_decisions: Any = None,
        raw_observations: Any = None,
    ) -> SpanInputs:
        """Bundles a ``JoinDecisions`` result with the parse steps' dead letters."""
        return cls(
            join.joined,
            join.unmatched,
            join.duplicate_decisions,
            join.duplicate_observations,
            rejected_decisions,
            rejected_observations,
            raw_decisions,
            raw_observations,
        )


class SpanResult(NamedTuple):
    """What ``WriteSpan`` returns: the written file names and the manifest's path."""

    train_files: Any
    eval_files: Any
    unmatched_files: Any
    rejected_files: Any
    manifest: Any  # PCollection holding the manifest dict, once written


# ---------------------------------------------------------------------------------------------
# Accounting


class SpanStats:
    """Mergeable counts of one span; ``build_manifest`` turns them into the manifest."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.rejected: dict[str, Counter] = {"decision": Counter(), "observation": Counter()}
        self.min_time_ms: int | None = None
        self.max_time_ms: int | None = None
        self.delays: Counter = Counter()
        self.delay_resolution_ms = 1
        self.offsets_total = 0
        self.offsets_within: Counter = Counter()  # alternative window (ms) -> offsets it counts

    def see_time(self, ms: int) -> None:
        if self.min_time_ms is None or ms < self.min_time_ms:
            self.min_time_ms = ms
        if self.max_time_ms is None or ms > self.max_time_ms:
            self.max_time_ms = ms

    def merge(self, other: SpanStats) -> SpanStats:
        self.counts.update(other.counts)
        for source, reasons in other.rejected.items():
            self.rejected.setdefault(source, Counter()).update(reasons)
        for ms in (other.min_time_ms, other.max_time_ms):
            if ms is not None:
                self.see_time(ms)
        if other.delay_resolution_ms > self.delay_resolution_ms:
            self._coarsen(other.delay_resolution_ms)
            self.delays.update(other.delays)
        else:
            self.delays.update(
                _coarsened(other.delays, self.delay_resolution_ms, other.delay_resolution_ms)
            )
        self.offsets_total += other.offsets_total
        self.offsets_within.update(other.offsets_within)
        if len(self.delays) > _EXACT_DELAYS and self.delay_resolution_ms < 1000:
            self._coarsen(1000)
        return self

    def _coarsen(self, resolution_ms: int) -> None:
        self.delays = _coarsened(self.delays, resolution_ms, self.delay_resolution_ms)
        self.delay_resolution_ms = resolution_ms

    def delay_quantiles(self) -> dict:
        """Nearest-rank p50/p90/p99 of the label delays in milliseconds (None when no delays)."""
        total = sum(self.delays.values())
        out: dict[str, Any] = {"count": total, "resolution_ms": self.delay_resolution_ms}
        ordered = sorted(self.delays.items())
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            out[f"{name}_ms"] = _nearest_rank(ordered, total, q)
        return out


def _coarsened(delays: Counter, resolution_ms: int, current_ms: int) -> Counter:
    if resolution_ms <= current_ms:
        return delays
    out: Counter = Counter()
    for ms, n in delays.items():
        out[int(round(ms / resolution_ms)) * resolution_ms] += n
    return out


def _nearest_rank(ordered: list[tuple[int, int]], total: int, q: float) -> int | None:
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for value, n in ordered:
        seen += n
        if seen >= rank:
            return value
    return ordered[-1][0]


def alternative_windows_ms(blueprint: Blueprint) -> tuple[int, ...]:
    """The label windows the manifest prices: multiples of the blueprint's, and one day."""
    windows = {max(1, int(blueprint.label.window_ms * f)) for f in ALTERNATIVE_WINDOW_FACTORS}
    windows.add(DAY_MS)
    return tuple(sorted(windows))


class _SpanStatsFn(beam.CombineFn):
    """Counts one kind of span element (``joined``, ``unmatched``, ...) into a SpanStats."""

    def __init__(
        self,
        kind: str,
        eval_fraction: float = 0.0,
        backward_slack_ms: int = 0,
        windows_ms: tuple[int, ...] = (),
    ):
        self.kind = kind
        self.eval_fraction = eval_fraction
        self.backward_slack_ms = backward_slack_ms
        self.windows_ms = windows_ms

    def create_accumulator(self) -> SpanStats:
        return SpanStats()

    def add_input(self, stats: SpanStats, element: Any) -> SpanStats:
        counts = stats.counts
        kind = self.kind
        if kind == "joined":
            self._add_joined(stats, element)
        elif kind == "unmatched":
            reason = element.reason
            counts["observations_orphan" if reason == ORPHAN else "observations_out_of_window"] += 1
            if reason not in (ORPHAN, OUT_OF_WINDOW):
                counts["unmatched_unknown_reason"] += 1
            stats.see_time(element.event.event_time_ms)
        elif kind == "duplicate_decisions":
            counts["duplicate_decisions"] += 1
            stats.see_time(element.event_time_ms)
        elif kind == "duplicate_observations":
            counts["duplicate_observations"] += 1
            stats.see_time(element.event_time_ms)
        elif kind in ("rejected_decisions", "rejected_observations"):
            counts[kind] += 1
            source = "decision" if kind == "rejected_decisions" else "observation"
            stats.rejected[source][element.reason] += 1
        else:  # raw_decisions / raw_observations
            counts[kind] += 1
        return stats

    def _add_joined(self, stats: SpanStats, joined: JoinedDecision) -> None:
        counts = stats.counts
        decision = joined.decision
        td = decision.event_time_ms
        counts["examples_written"] += 1
        counts["examples_observed" if joined.join_status == OBSERVED else "examples_default"] += 1
        if joined.join_status not in (OBSERVED, DEFAULT):
            counts["joined_unknown_status"] += 1
        counts[EVAL if is_eval(decision.decision_id, self.eval_fraction) else TRAIN] += 1
        counts["observations_used"] += joined.observations_used
        stats.see_time(td)
        offsets = joined.observation_offsets_ms
        if offsets:
            stats.see_time(td + min(offsets))
            stats.see_time(td + max(offsets))
            stats.offsets_total += len(offsets)
            low = -self.backward_slack_ms
            for window_ms in self.windows_ms:
                stats.offsets_within[window_ms] += sum(1 for o in offsets if low <= o <= window_ms)
        stats.delays.update(joined.label_delays_ms)

    def merge_accumulators(self, accumulators: Iterable[SpanStats]) -> SpanStats:
        merged = SpanStats()
        for stats in accumulators:
            merged.merge(stats)
        return merged

    def extract_output(self, stats: SpanStats) -> SpanStats:
        return stats


def _count_stats(count: int, name: str) -> SpanStats:
    stats = SpanStats()
    stats.counts[name] = count
    return stats


def build_manifest(
    stats: SpanStats,
    blueprint: Blueprint,
    allowed_lateness_ms: int,
    files: dict[str, list[str]],
    counted_raw: tuple[bool, bool] = (False, False),
) -> dict:
    """The manifest of DESIGN.md from merged span stats (pure: testable without a pipeline)."""
    c = stats.counts
    examples_written = c["examples_written"]
    rejected_decisions = c["rejected_decisions"]
    rejected_observations = c["rejected_observations"]
    derived_decisions_in = examples_written + c["duplicate_decisions"] + rejected_decisions
    derived_observations_in = (
        c["observations_used"]
        + c["observations_out_of_window"]
        + c["observations_orphan"]
        + c["duplicate_observations"]
        + rejected_observations
    )
    counts = {
        "decisions_in": c["raw_decisions"] if counted_raw[0] else derived_decisions_in,
        "examples_written": examples_written,
        "examples_observed": c["examples_observed"],
        "examples_default": c["examples_default"],
        "duplicate_decisions": c["duplicate_decisions"],
        "rejected_decisions": rejected_decisions,
        "observations_in": c["raw_observations"] if counted_raw[1] else derived_observations_in,
        "observations_used": c["observations_used"],
        "observations_out_of_window": c["observations_out_of_window"],
        "observations_orphan": c["observations_orphan"],
        "duplicate_observations": c["duplicate_observations"],
        "rejected_observations": rejected_observations,
        "examples_train": c[TRAIN],
        "examples_eval": c[EVAL],
    }
    checks = {
        "decisions": counts["decisions_in"] == derived_decisions_in,
        "examples": examples_written == counts["examples_observed"] + counts["examples_default"],
        "observations": counts["observations_in"] == derived_observations_in,
        "split": examples_written == counts["examples_train"] + counts["examples_eval"],
        "known_kinds": c["unmatched_unknown_reason"] == 0 and c["joined_unknown_status"] == 0,
    }
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
        "event_time_range": {
            "min": None if stats.min_time_ms is None else format_event_time(stats.min_time_ms),
            "max": None if stats.max_time_ms is None else format_event_time(stats.max_time_ms),
        },
        "label_delay": stats.delay_quantiles(),
        "alternative_windows": {
            "observations_of_known_decisions": stats.offsets_total,
            "windows": windows,
        },
        "files": {name: sorted(paths) for name, paths in files.items()},
    }


# ---------------------------------------------------------------------------------------------
# Writing


class EncodeExamples(beam.DoFn):
    """JoinedDecision -> serialized tf.Example on the ``train`` or ``eval`` output."""

    def __init__(self, blueprint: Blueprint, key: bytes | None):
        self.blueprint = blueprint
        self.key = key
        self.eval_fraction = blueprint.eval_fraction
        self.train_counter = Metrics.counter("loopline.write_span", "examples_train")
        self.eval_counter = Metrics.counter("loopline.write_span", "examples_eval")

    def process(self, joined: JoinedDecision) -> Iterable[Any]:
        serialized = joined_to_example(joined, self.blueprint, self.key).SerializeToString(
            deterministic=True
        )
        if is_eval(joined.decision.decision_id, self.eval_fraction):
            self.eval_counter.inc()
            yield beam.pvalue.TaggedOutput(EVAL, serialized)
        else:
            self.train_counter.inc()
            yield serialized


def _unmatched_json(unmatched: Any) -> str:
    return json.dumps(unmatched.to_dict(), sort_keys=True, separators=(",", ":"))


def _refusal_json(refusal: Refusal) -> str:
    return json.dumps(refusal.to_dict(), sort_keys=True, separators=(",", ":"))


class _ManifestDoFn(beam.DoFn):
    """What both manifest writers need: where the span goes and how it was joined."""

    def __init__(
        self,
        output_dir: str,
        blueprint: Blueprint,
        allowed_lateness_ms: int,
        counted_raw: tuple[bool, bool],
    ):
        self.output_dir = output_dir
        self.blueprint = blueprint
        self.allowed_lateness_ms = allowed_lateness_ms
        self.counted_raw = counted_raw


class _WriteManifest(_ManifestDoFn):
    """Writes manifest.json once every file of the span is final (its side inputs)."""

    def process(
        self, _: Any, stats: list, train: list, eval_: list, unmatched: list, rejected: list
    ) -> Iterable[dict]:
        merged = SpanStats()
        for s in stats:
            merged.merge(s)
        files = {
            "train": train,
            "eval": eval_,
            "unmatched_observations": unmatched,
            "rejected": rejected,
        }
        manifest = build_manifest(
            merged,
            self.blueprint,
            self.allowed_lateness_ms,
            {k: [str(p) for p in v] for k, v in files.items()},
            self.counted_raw,
        )
        write_json_atomically(FileSystems.join(self.output_dir, MANIFEST), manifest)
        Metrics.counter("loopline.write_span", "manifests_written").inc()
        yield manifest


def write_json_atomically(path: str, data: dict) -> None:
    """Writes JSON under a temporary name and renames it, so readers never see half a file."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp, mime_type="application/json") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


class _GzipTFRecordSink(fileio.FileSink):
    """fileio sink for windowed (streaming) writes: gzip TFRecords of serialized examples.

    The sink gzips itself (the file is opened uncompressed): fileio closes its writers once per
    bundle, and Beam's compressed file handle cannot be flushed again after that, so ``flush``
    finishes the gzip stream here and is safe to call more than once.
    """

    def create_metadata(self, destination: str, full_file_name: str) -> fileio.FileMetadata:
        return fileio.FileMetadata(
            mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED
        )

    def open(self, fh: Any) -> None:
        self._fh = fh
        self._gzip = None

    def write(self, record: bytes) -> None:
        if self._gzip is None:
            self._gzip = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 31)
        framed = io.BytesIO()
        _TFRecordUtil.write_record(framed, record)
        self._fh.write(self._gzip.compress(framed.getvalue()))

    def flush(self) -> None:
        if self._gzip is not None:
            self._fh.write(self._gzip.flush(zlib.Z_FINISH))
            self._gzip = None
        if not getattr(self._fh, "closed", False):
            self._fh.flush()


def _tag_file_result(result: Any, kind: str, directory: str) -> tuple[str, str]:
    # fileio reports a file's name relative to the directory it wrote to.
    name = result.file_name
    if not name.startswith(directory):
        name = FileSystems.join(directory, name)
    return kind, name


def _window_name(window: Any) -> str:
    start = format_event_time(window.start.micros // 1000).replace(":", "")
    end = format_event_time(window.end.micros // 1000).replace(":", "")
    return f"{start}_{end}"


class _Delay(beam.DoFn):
    """Moves each element's timestamp ``delay_ms`` later (never earlier: no late data made)."""

    def __init__(self, delay_ms: int):
        self.delay = beam_window.Duration(micros=delay_ms * 1000)

    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam) -> Iterable[Any]:
        yield beam_window.TimestampedValue(element, timestamp + self.delay)


class _CatchUpLatePanes(beam.DoFn):
    """Moves an element of a late join pane ``delay_ms`` later; on-time panes pass unchanged.

    A late pane of the streaming join (an event that arrived after its decision's session fired)
    is timestamped at its session's end, which the watermark has passed, so its output window
    would drop it as late. The join accepts such an event only while the watermark is within
    its own allowed lateness (the session gap) of that end, so moved by the gap its timestamp
    is at or past the watermark: it lands, counted, in a still open output window.
    """

    def __init__(self, delay_ms: int):
        self.delay = beam_window.Duration(micros=delay_ms * 1000)

    def process(
        self,
        element: Any,
        timestamp: Any = beam.DoFn.TimestampParam,
        pane: Any = beam.DoFn.PaneInfoParam,
    ) -> Iterable[Any]:
        if pane is not None and pane.timing == PaneInfoTiming.LATE:
            Metrics.counter("loopline.write_span", "late_join_outputs").inc()
            yield beam_window.TimestampedValue(element, timestamp + self.delay)
        else:
            yield element


class _WriteWindowManifest(_ManifestDoFn):
    """Streaming: one manifest per output window, once its files are written (same pane)."""

    def process(
        self, element: tuple[Any, Iterable[tuple[str, Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterable[dict]:
        merged = SpanStats()
        files: dict[str, list[str]] = {
            "train": [],
            "eval": [],
            "unmatched_observations": [],
            "rejected": [],
        }
        items = list(element[1])
        if not items:
            # The DirectRunner may fire an empty final pane after the window's on-time one; it
            # must not overwrite that window's manifest with zeros.
            return
        for kind, value in items:
            if kind == "stats":
                merged.merge(value)
            else:
                files[kind].append(str(value))
        manifest = build_manifest(
            merged, self.blueprint, self.allowed_lateness_ms, files, self.counted_raw
        )
        manifest["output_window"] = {
            "start": format_event_time(window.start.micros // 1000),
            "end": format_event_time(window.end.micros // 1000),
        }
        name = f"manifest-{_window_name(window)}.json"
        write_json_atomically(FileSystems.join(self.output_dir, "manifests", name), manifest)
        Metrics.counter("loopline.write_span", "manifests_written").inc()
        yield manifest


class WriteSpan(beam.PTransform):
    """Writes a span (examples, unmatched observations, dead letters) and then its manifest.

    Args:
        output_dir: the span directory (local or any Beam filesystem such as gs://).
        blueprint: the parsed blueprint the join ran with.
        key: the pseudonymisation key from ``transforms.examples.pii_key`` (None when the
            blueprint pseudonymises nothing). Given here so workers never read the environment.
        num_shards: files per split; None lets the runner choose (one per bundle, no shuffle).
        allowed_lateness_ms: recorded in the manifest's window settings.

    Applied to ``SpanInputs``; returns ``SpanResult``.

    >>> inputs = SpanInputs.from_join(join, rejected_decisions, rejected_observations)
    >>> inputs | "WriteSpan" >> WriteSpan("out/notify/2026-11-01", blueprint, key)
    """

    def __init__(
        self,
        output_dir: str,
        blueprint: Blueprint,
        key: bytes | None = None,
        num_shards: int | None = None,
        allowed_lateness_ms: int = 0,
        output_window_ms: int | None = None,
    ):
        super().__init__()
        if blueprint.privacy.pseudonymise and not key:
            raise PiiKeyMissing(
                f"blueprint {blueprint.name} pseudonymises {', '.join(blueprint.privacy.pseudonymise)}"
                f" but WriteSpan got no key; pass transforms.examples.pii_key(blueprint)"
            )
        if num_shards is not None and num_shards < 1:
            raise ValueError(
                f"num_shards must be at least 1 (or None to let the runner choose), got {num_shards}"
            )
        self.output_dir = output_dir
        self.blueprint = blueprint
        self.key = key
        self.num_shards = num_shards
        self.allowed_lateness_ms = allowed_lateness_ms
        self.output_window_ms = output_window_ms

    def _extract_input_pvalues(self, pvalueish: Any) -> tuple[Any, dict]:
        # SpanInputs leaves the raw inputs as None when they are not counted; Beam wants only
        # PCollections among a transform's inputs.
        if isinstance(pvalueish, SpanInputs):
            present = {k: v for k, v in pvalueish._asdict().items() if v is not None}
            return pvalueish, present
        return super()._extract_input_pvalues(pvalueish)

    def _path(self, *parts: str) -> str:
        return FileSystems.join(self.output_dir, *parts)

    def expand(self, inputs: SpanInputs) -> SpanResult:
        if self.output_window_ms is not None:
            return self._expand_windowed(inputs)
        bp = self.blueprint
        shards = self.num_shards or 0
        pipeline = inputs.joined.pipeline
        stats_fns = {
            "joined": _SpanStatsFn(
                "joined", bp.eval_fraction, bp.label.backward_slack_ms, alternative_windows_ms(bp)
            ),
        }

        def global_(name: str, pcoll: Any) -> Any:
            if isinstance(pcoll.windowing.windowfn, beam_window.GlobalWindows):
                return pcoll  # already global: no per-element step
            return pcoll | f"Rewindow[{name}]" >> beam.WindowInto(beam_window.GlobalWindows())

        joined = global_("joined", inputs.joined)
        encoded = joined | "EncodeExamples" >> beam.ParDo(
            EncodeExamples(bp, self.key)
        ).with_outputs(EVAL, main=TRAIN)
        written = {}
        for split in (TRAIN, EVAL):
            written[split] = encoded[split] | f"WriteExamples[{split}]" >> beam.io.WriteToTFRecord(
                self._path("examples", split, "part"),
                file_name_suffix=EXAMPLES_SUFFIX,
                num_shards=shards,
                compression_type=CompressionTypes.GZIP,
            )
        unmatched = global_("unmatched", inputs.unmatched)
        written["unmatched"] = (
            unmatched
            | "UnmatchedToJson" >> beam.Map(_unmatched_json)
            | "WriteUnmatched"
            >> beam.io.WriteToText(
                self._path("unmatched_observations", "part"),
                file_name_suffix=JSONL_SUFFIX,
                num_shards=shards,
            )
        )
        rejected_d = global_("rejected_decisions", inputs.rejected_decisions)
        rejected_o = global_("rejected_observations", inputs.rejected_observations)
        written["rejected"] = (
            (rejected_d, rejected_o)
            | "FlattenRejected" >> beam.Flatten()
            | "RejectedToJson" >> beam.Map(_refusal_json)
            | "WriteRejected"
            >> beam.io.WriteToText(
                self._path("rejected", "part"), file_name_suffix=JSONL_SUFFIX, num_shards=shards
            )
        )

        parts = {
            "joined": joined,
            "unmatched": unmatched,
            "duplicate_decisions": global_("duplicate_decisions", inputs.duplicate_decisions),
            "duplicate_observations": global_(
                "duplicate_observations", inputs.duplicate_observations
            ),
            "rejected_decisions": rejected_d,
            "rejected_observations": rejected_o,
        }
        stats = [
            pcoll
            | f"Count[{name}]" >> beam.CombineGlobally(stats_fns.get(name, _SpanStatsFn(name)))
            for name, pcoll in parts.items()
        ]
        # Raw inputs are the largest collections and only need a count: Beam's own counter.
        for raw in ("raw_decisions", "raw_observations"):
            if getattr(inputs, raw) is not None:
                stats.append(
                    global_(raw, getattr(inputs, raw))
                    | f"Count[{raw}]" >> beam.combiners.Count.Globally()
                    | f"ToStats[{raw}]" >> beam.Map(_count_stats, raw)
                )
        all_stats = stats | "FlattenStats" >> beam.Flatten()

        manifest = (
            pipeline
            | "ManifestTrigger" >> beam.Create([None])
            | "WriteManifest"
            >> beam.ParDo(
                _WriteManifest(
                    self.output_dir,
                    bp,
                    self.allowed_lateness_ms,
                    (inputs.raw_decisions is not None, inputs.raw_observations is not None),
                ),
                stats=beam.pvalue.AsList(all_stats),
                train=beam.pvalue.AsList(written[TRAIN]),
                eval_=beam.pvalue.AsList(written[EVAL]),
                unmatched=beam.pvalue.AsList(written["unmatched"]),
                rejected=beam.pvalue.AsList(written["rejected"]),
            )
        )
        return SpanResult(
            written[TRAIN], written[EVAL], written["unmatched"], written["rejected"], manifest
        )

    def _expand_windowed(self, inputs: SpanInputs) -> SpanResult:
        """Streaming: files and a manifest per fixed event-time output window.

        Each window's examples, unmatched observations and dead letters are written under the
        usual directories with the window in their names, and
        ``manifests/manifest-<start>_<end>.json`` follows once that window's files are final.
        """
        bp = self.blueprint
        size = beam_window.Duration(micros=self.output_window_ms * 1000)
        shards = self.num_shards or 1

        def windowed(name: str, pcoll: Any) -> Any:
            return pcoll | f"OutputWindow[{name}]" >> beam.WindowInto(
                beam_window.FixedWindows(size)
            )

        # What the join emits after a decision's session fired (an observation beyond the
        # horizon, reported orphan; a decision re-delivered that late) comes in a late pane,
        # behind the watermark; moved forward by the join's lateness (its session gap) it is
        # on time for the current output window instead of being dropped (_CatchUpLatePanes).
        catch_up = _CatchUpLatePanes(session_gap_ms(bp, self.allowed_lateness_ms))

        def join_output(name: str, pcoll: Any) -> Any:
            return windowed(name, pcoll | f"CatchUpLatePanes[{name}]" >> beam.ParDo(catch_up))

        joined = join_output("joined", inputs.joined)
        encoded = joined | "EncodeExamples" >> beam.ParDo(
            EncodeExamples(bp, self.key)
        ).with_outputs(EVAL, main=TRAIN)
        written = {}
        for split in (TRAIN, EVAL):
            written[split] = encoded[split] | f"WriteExamples[{split}]" >> fileio.WriteToFiles(
                self._path("examples", split),
                file_naming=fileio.default_file_naming("part", EXAMPLES_SUFFIX),
                sink=_GzipTFRecordSink(),
                shards=shards,
            )
        unmatched = join_output("unmatched", inputs.unmatched)
        written["unmatched_observations"] = (
            unmatched
            | "UnmatchedToJson" >> beam.Map(_unmatched_json)
            | "WriteUnmatched"
            >> fileio.WriteToFiles(
                self._path("unmatched_observations"),
                file_naming=fileio.default_file_naming("part", JSONL_SUFFIX),
                shards=shards,
            )
        )
        # A dead letter keeps its message's event time, so one that arrives behind the
        # watermark would be dropped as late by its output window. Shifted forward by the
        # allowed lateness, it is on time whenever its message is within the allowed lateness.
        delay = _Delay(self.allowed_lateness_ms)
        rejected_d = windowed(
            "rejected_decisions",
            inputs.rejected_decisions | "DelayRejected[decisions]" >> beam.ParDo(delay),
        )
        rejected_o = windowed(
            "rejected_observations",
            inputs.rejected_observations | "DelayRejected[observations]" >> beam.ParDo(delay),
        )
        written["rejected"] = (
            (rejected_d, rejected_o)
            | "FlattenRejected" >> beam.Flatten()
            | "RejectedToJson" >> beam.Map(_refusal_json)
            | "WriteRejected"
            >> fileio.WriteToFiles(
                self._path("rejected"),
                file_naming=fileio.default_file_naming("part", JSONL_SUFFIX),
                shards=shards,
            )
        )
        parts = {
            "joined": joined,
            "unmatched": unmatched,
            "duplicate_decisions": join_output("duplicate_decisions", inputs.duplicate_decisions),
            "duplicate_observations": join_output(
                "duplicate_observations", inputs.duplicate_observations
            ),
            "rejected_decisions": rejected_d,
            "rejected_observations": rejected_o,
        }
        # Raw inputs are not counted per window: a decision is written in the window where its
        # session closes, not where it was read, so a window's decisions_in / observations_in
        # are the sums of its outputs (summed over all windows they equal what was read).
        joined_fn = _SpanStatsFn(
            "joined", bp.eval_fraction, bp.label.backward_slack_ms, alternative_windows_ms(bp)
        )
        tagged = [
            pcoll
            | f"Count[{name}]"
            >> beam.CombineGlobally(
                joined_fn if name == "joined" else _SpanStatsFn(name)
            ).without_defaults()
            | f"Tag[{name}]" >> beam.Map(lambda stats: ("stats", stats))
            for name, pcoll in parts.items()
        ]
        directories = {
            "train": self._path("examples", TRAIN),
            "eval": self._path("examples", EVAL),
            "unmatched_observations": self._path("unmatched_observations"),
            "rejected": self._path("rejected"),
        }
        for kind, directory in directories.items():
            tagged.append(
                written[kind] | f"Tag[{kind}]" >> beam.Map(_tag_file_result, kind, directory)
            )
        manifest = (
            tagged
            | "FlattenWindowOutputs" >> beam.Flatten()
            | "KeyByWindow" >> beam.Map(lambda item: (None, item))
            | "GroupWindowOutputs" >> beam.GroupByKey()
            | "WriteManifests"
            >> beam.ParDo(
                _WriteWindowManifest(self.output_dir, bp, self.allowed_lateness_ms, (False, False))
            )
        )
        return SpanResult(
            written[TRAIN],
            written[EVAL],
            written["unmatched_observations"],
            written["rejected"],
            manifest,
        )
