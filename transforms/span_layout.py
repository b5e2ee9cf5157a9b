"""Where and when a span is written: one span in batch, or one per output window.

``WriteSpan`` builds the same steps for both and asks its layout the few things that differ:

* ``BatchLayout``: inputs in the global window; the span is claimed (``span_commit``, step 1)
  before any file is written (the claim is a side input of every writer), and committed once
  every input is counted, from a ``Create`` trigger with the stats and files as side inputs;
  the input counts are what was read.
* ``WindowedLayout``: inputs in fixed event-time windows (late join panes and dead letters
  moved forward so the window still counts them, ``transforms.late_panes``); each window's
  stats and files are grouped and committed as one complete span in
  ``OUTPUT/<window start without ':'>``, claimed at its commit; the input counts are the sums
  of the window's outputs.

    >>> layout = BatchLayout("out/notify/2026-11-01", num_shards=None)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window

from loopline.blueprint import Blueprint
from loopline.events import format_event_time
from transforms.late_panes import CatchUpLatePanes, DelayTimestamps
from transforms.manifest import COUNTER_NAMESPACE, MANIFESTS_WRITTEN_COUNTER, build_manifest
from transforms.span_commit import claim_span, commit_span, remove_tree, temp_dir
from transforms.span_stats import SpanStats, merged
from transforms.span_writers import window_label


class ManifestSpec(NamedTuple):
    """What a manifest records besides the stats and files: how the span was joined."""

    blueprint: Blueprint
    allowed_lateness_ms: int
    counted_inputs: frozenset
    observation_range: tuple = (None, None)

    def build(self, stats: SpanStats, files: dict) -> dict:
        return build_manifest(
            stats,
            self.blueprint,
            self.allowed_lateness_ms,
            files,
            self.counted_inputs,
            self.observation_range,
        )


class ClaimSpan(beam.DoFn):
    """Claims the span for this run and clears what earlier runs left (span_commit, step 1)."""

    def __init__(self, span_dir: str):
        self.span_dir = span_dir

    def process(self, run_id: str) -> Iterable[str]:
        claim_span(self.span_dir, run_id)
        yield run_id


class CommitSpan(beam.DoFn):
    """Batch: moves the files into place and writes the manifest once every input is counted."""

    def __init__(self, layout: BatchLayout, run_id: str, spec: ManifestSpec):
        self.layout = layout
        self.run_id = run_id
        self.spec = spec

    def process(self, _: Any, stats: list, files: list, claim: str) -> Iterable[dict]:
        total = merged(stats)
        span_dir = self.layout.output_dir
        manifest = commit_span(
            span_dir,
            self.run_id,
            files,
            self.layout.num_shards,
            lambda written: self.spec.build(total, written),
        )
        remove_tree(temp_dir(span_dir, self.run_id))
        Metrics.counter(COUNTER_NAMESPACE, MANIFESTS_WRITTEN_COUNTER).inc()
        yield manifest


class CommitWindowSpan(beam.DoFn):
    """Streaming: one complete span per output window, committed once its files are written."""

    def __init__(self, layout: WindowedLayout, run_id: str, spec: ManifestSpec):
        self.layout = layout
        self.run_id = run_id
        self.spec = spec

    def process(
        self, element: tuple[Any, Iterable[tuple[str, Any]]], window: Any = beam.DoFn.WindowParam
    ) -> Iterable[dict]:
        items = list(element[1])
        if not items:
            # The DirectRunner may fire an empty final pane after the window's on-time one; it
            # must not overwrite that window's span with an empty one.
            return
        stats = merged(value for kind, value in items if kind == "stats")
        files = [value for kind, value in items if kind == "file"]
        span_dir = FileSystems.join(self.layout.output_dir, window_label(window))
        output_window = {
            "start": format_event_time(window.start.micros // 1000),
            "end": format_event_time(window.end.micros // 1000),
        }

        def manifest_of(written: dict) -> dict:
            manifest = self.spec.build(stats, written)
            manifest["output_window"] = output_window
            return manifest

        claim_span(span_dir, self.run_id)
        manifest = commit_span(span_dir, self.run_id, files, self.layout.num_shards, manifest_of)
        temp_root = temp_dir(self.layout.output_dir, self.run_id)
        remove_tree(FileSystems.join(temp_root, window_label(window)))
        Metrics.counter(COUNTER_NAMESPACE, MANIFESTS_WRITTEN_COUNTER).inc()
        yield manifest


class BatchLayout:
    """One span in ``output_dir``: inputs in the global window, claimed before any file is
    written (a side input of every writer) and committed once everything is counted."""

    counted_inputs = frozenset({"decisions_in", "observations_in"})

    def __init__(self, output_dir: str, num_shards: int | None):
        self.output_dir = output_dir
        self.num_shards = num_shards

    def join_output(self, name: str, pcoll: Any) -> Any:
        if isinstance(pcoll.windowing.windowfn, beam_window.GlobalWindows):
            return pcoll  # already global: no per-element step
        return pcoll | f"Rewindow[{name}]" >> beam.WindowInto(beam_window.GlobalWindows())

    dead_letters = join_output

    def claim(self, pipeline: Any, run_id: str) -> dict:
        claimed = (
            pipeline
            | "ClaimRun" >> beam.Create([run_id])
            | "ClaimSpan" >> beam.ParDo(ClaimSpan(self.output_dir))
        )
        return {"claim": beam.pvalue.AsSingleton(claimed)}

    def combine(self, name: str, pcoll: Any, fn: beam.CombineFn) -> Any:
        return pcoll | f"Count[{name}]" >> beam.CombineGlobally(fn)

    def commit(
        self, pipeline: Any, stats: Any, files: Any, gate: dict, run_id: str, spec: ManifestSpec
    ) -> Any:
        return (
            pipeline
            | "CommitTrigger" >> beam.Create([None])
            | "CommitSpan"
            >> beam.ParDo(
                CommitSpan(self, run_id, spec),
                stats=beam.pvalue.AsList(stats),
                files=beam.pvalue.AsList(files),
                **gate,
            )
        )


class WindowedLayout:
    """One span per fixed event-time window of ``window_ms``, in ``output_dir/<start>``.

    Raw inputs are not counted per window: a decision is written in the window where its
    session closes, not where it was read, so a window's ``decisions_in`` / ``observations_in``
    are the sums of its outputs (summed over all windows they equal what was read).
    """

    counted_inputs = frozenset()

    def __init__(
        self, output_dir: str, num_shards: int | None, window_ms: int, late_join_ms: int,
        late_dead_letter_ms: int,
    ):  # fmt: skip
        self.output_dir = output_dir
        self.num_shards = num_shards or 1
        self.window = beam_window.FixedWindows(beam_window.Duration(micros=window_ms * 1000))
        self.late_join_ms = late_join_ms
        self.late_dead_letter_ms = late_dead_letter_ms

    def _windowed(self, name: str, pcoll: Any) -> Any:
        return pcoll | f"OutputWindow[{name}]" >> beam.WindowInto(self.window)

    def join_output(self, name: str, pcoll: Any) -> Any:
        caught_up = pcoll | f"CatchUpLatePanes[{name}]" >> beam.ParDo(
            CatchUpLatePanes(self.late_join_ms)
        )
        return self._windowed(name, caught_up)

    def dead_letters(self, name: str, pcoll: Any) -> Any:
        delayed = pcoll | f"DelayDeadLetters[{name}]" >> beam.ParDo(
            DelayTimestamps(self.late_dead_letter_ms)
        )
        return self._windowed(name, delayed)

    def claim(self, pipeline: Any, run_id: str) -> dict:
        return {}  # each window's span is claimed when it is committed

    def combine(self, name: str, pcoll: Any, fn: beam.CombineFn) -> Any:
        return pcoll | f"Count[{name}]" >> beam.CombineGlobally(fn).without_defaults()

    def commit(
        self, pipeline: Any, stats: Any, files: Any, gate: dict, run_id: str, spec: ManifestSpec
    ) -> Any:
        tagged = (
            stats | "TagStats" >> beam.Map(lambda s: ("stats", s)),
            files | "TagFiles" >> beam.Map(lambda f: ("file", f)),
        )
        return (
            tagged
            | "FlattenWindowOutputs" >> beam.Flatten()
            | "KeyByWindow" >> beam.Map(lambda item: (None, item))
            | "GroupWindowOutputs" >> beam.GroupByKey()
            | "CommitWindowSpans" >> beam.ParDo(CommitWindowSpan(self, run_id, spec))
        )
