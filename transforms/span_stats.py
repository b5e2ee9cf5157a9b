"""Mergeable statistics of a span, and how each of WriteSpan's inputs adds to them.

``SpanStats`` is the accumulator: counts under the manifest's own names
(``transforms.manifest.COUNT_NAMES``), refusals by reason, the event-time range, label delays
and the observation offsets the alternative windows are priced from. ``adders(blueprint)`` is
the table of how one element of each input adds to it, and ``SpanStatsFn(add)`` the one small
CombineFn that folds a PCollection with one of them.

    >>> add = adders(blueprint)
    >>> stats = joined | beam.CombineGlobally(SpanStatsFn(add["joined"]))
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam

from loopline.blueprint import Blueprint
from loopline.events import DeadLetter
from transforms.join import DEFAULT, OBSERVED, JoinedDecision
from transforms.manifest import UNMATCHED_COUNTS, alternative_windows_ms
from transforms.split import is_eval

# Distinct label delays kept exactly; beyond it delays are kept to the second.
_EXACT_DELAYS = 100_000


class SpanStats:
    """Mergeable counts of one span; ``transforms.manifest.build_manifest`` reads them."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.rejected: dict[str, Counter] = {"decision": Counter(), "observation": Counter()}
        self.min_time_ms: int | None = None
        self.max_time_ms: int | None = None
        self.delays: Counter = Counter()
        self.delay_resolution_ms = 1
        self.offsets_total = 0
        self.offsets_within: Counter = Counter()  # alternative window (ms) -> offsets it counts

    @classmethod
    def of_count(cls, count: int, name: str) -> SpanStats:
        """Stats holding one count (what a plain ``Count.Globally`` measured)."""
        stats = cls()
        stats.counts[name] = count
        return stats

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


def merged(stats: Iterable[SpanStats]) -> SpanStats:
    """One SpanStats holding all of ``stats``."""
    out = SpanStats()
    for s in stats:
        out.merge(s)
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


# ---------------------------------------------------------------------------------------------
# How one element of each input adds to the stats


class AddJoined:
    """Adds a JoinedDecision: an example (observed or default, train or eval), the observations
    it used, its label delays and the offsets the alternative windows are priced from."""

    def __init__(self, eval_fraction: float, backward_slack_ms: int, windows_ms: tuple[int, ...]):
        self.eval_fraction = eval_fraction
        self.backward_slack_ms = backward_slack_ms
        self.windows_ms = windows_ms

    def __call__(self, stats: SpanStats, joined: JoinedDecision) -> None:
        counts = stats.counts
        decision = joined.decision
        td = decision.event_time_ms
        counts["examples_written"] += 1
        if joined.join_status == OBSERVED:
            counts["examples_observed"] += 1
        elif joined.join_status == DEFAULT:
            counts["examples_default"] += 1
        else:
            counts["unknown_join_status"] += 1
        split = "eval" if is_eval(decision.decision_id, self.eval_fraction) else "train"
        counts[f"examples_{split}"] += 1
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
        if joined.label_delays_ms:  # most have none; Counter.update costs about 1 us
            stats.delays.update(joined.label_delays_ms)


def add_unmatched(stats: SpanStats, unmatched: Any) -> None:
    """An UnmatchedObservation, counted by its reason (``UNMATCHED_COUNTS``)."""
    stats.counts[UNMATCHED_COUNTS.get(unmatched.reason, "unknown_unmatched_reason")] += 1
    stats.see_time(unmatched.event.event_time_ms)


def add_duplicate_decision(stats: SpanStats, decision: Any) -> None:
    stats.counts["duplicate_decisions"] += 1
    stats.see_time(decision.event_time_ms)


def add_duplicate_observation(stats: SpanStats, observation: Any) -> None:
    stats.counts["duplicate_observations"] += 1
    stats.see_time(observation.event_time_ms)


def add_out_of_range_observation(stats: SpanStats, observation: Any) -> None:
    # Another span's observation: counted, but it does not widen this span's event-time range.
    stats.counts["observations_out_of_range"] += 1


def add_rejected_decision(stats: SpanStats, refusal: DeadLetter) -> None:
    stats.counts["rejected_decisions"] += 1
    stats.rejected["decision"][refusal.reason] += 1


def add_rejected_observation(stats: SpanStats, refusal: DeadLetter) -> None:
    stats.counts["rejected_observations"] += 1
    stats.rejected["observation"][refusal.reason] += 1


def add_late_decision(stats: SpanStats, late: DeadLetter) -> None:
    stats.counts["late_decisions"] += 1


def add_late_observation(stats: SpanStats, late: DeadLetter) -> None:
    stats.counts["late_observations"] += 1


def adders(blueprint: Blueprint) -> dict[str, Callable[[SpanStats, Any], None]]:
    """For each counted input of ``SpanInputs`` (by field name), how its elements add up."""
    return {
        "joined": AddJoined(
            blueprint.eval_fraction,
            blueprint.label.backward_slack_ms,
            alternative_windows_ms(blueprint),
        ),
        "unmatched": add_unmatched,
        "duplicate_decisions": add_duplicate_decision,
        "duplicate_observations": add_duplicate_observation,
        "out_of_range_observations": add_out_of_range_observation,
        "rejected_decisions": add_rejected_decision,
        "rejected_observations": add_rejected_observation,
        "late_decisions": add_late_decision,
        "late_observations": add_late_observation,
    }


class SpanStatsFn(beam.CombineFn):
    """Folds a PCollection into SpanStats with one of ``adders``' functions."""

    def __init__(self, add: Callable[[SpanStats, Any], None]):
        self.add = add

    def create_accumulator(self) -> SpanStats:
        return SpanStats()

    def add_input(self, stats: SpanStats, element: Any) -> SpanStats:
        self.add(stats, element)
        return stats

    def merge_accumulators(self, accumulators: Iterable[SpanStats]) -> SpanStats:
        return merged(accumulators)

    def extract_output(self, stats: SpanStats) -> SpanStats:
        return stats
