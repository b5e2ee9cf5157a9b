"""The decision–observation join (DESIGN.md, "Join semantics").

``JoinDecisions`` keys logged decisions and their delayed observations by ``decision_id``,
groups them (a CoGroupByKey over event-time windows), and classifies each group with the pure
function ``classify_decision_group``: one ``JoinedDecision`` per decision, every other input
event on exactly one of the other outputs.

    >>> decisions, observations = ...  # PCollections of DecisionEvent / ObservationEvent
    >>> joined = (decisions, observations) | JoinDecisions(blueprint)
    >>> joined.joined        # JoinedDecision, one per decision_id
    >>> joined.unmatched     # UnmatchedObservation: orphan or out_of_window

Windowing. In batch (bounded inputs, ``windowing="auto"``) the join groups over all time in
the global window, which is exact. On unbounded inputs it uses event-time session windows per
``decision_id`` whose gap is ``window + backward_slack + allowed_lateness`` (plus 1 ms, because
Beam's sessions are half-open and the label window is inclusive), with Beam's default trigger
(fire when the watermark passes the end of the session, then once more per late arrival) and
discarding panes:

* each decision is emitted exactly once, when the watermark passes its session's end, so an
  observation that arrives up to ``allowed_lateness`` behind the watermark is still classified
  exactly (DESIGN.md: "the join keeps a decision open for window + allowed_lateness");
* an event that arrives after its decision's session has fired lands in a pane of its own
  (discarding: the decision is not in it and is never re-emitted): an observation there is
  reported ``orphan``, DESIGN.md's "beyond the horizon", where a batch job would say
  ``out_of_window`` or count it. A decision re-delivered that late is joined on its own, so
  a duplicate decision is only caught within the horizon;
* Beam's own allowed lateness is set to the session gap, so such panes are produced for events
  up to about ``2 x gap`` behind their session; data later still is dropped by the runner,
  which counts it as dropped due to lateness.

Firing once instead of refining the label with late panes is deliberate: the outputs are
TFRecord examples, which cannot be retracted, so a decision must never be emitted twice.
(``AfterWatermark(late=AfterCount(1))`` would say the same, but stalls the Python
DirectRunner when a late element merges into an open session; the default trigger does not.)
``windowing="session"`` forces the session windows in batch too (the batch/streaming
comparison test uses it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration

from loopline.blueprint import Blueprint, Label
from loopline.events import DecisionEvent, ObservationEvent
from transforms.labels import LabelFn, cast_label, compute_label

OBSERVED = "observed"
DEFAULT = "default"
ORPHAN = "orphan"
OUT_OF_WINDOW = "out_of_window"

WINDOWINGS = ("auto", "global", "session")

# Names of the outputs of the classification step; also the counters' names.
_JOINED = "joined"
_UNMATCHED = "unmatched"
_DUPLICATE_DECISIONS = "duplicate_decisions"
_DUPLICATE_OBSERVATIONS = "duplicate_observations"

# Counters in namespace loopline.join, one per count of DESIGN.md's manifest.
COUNTERS = (
    "decisions_in",
    "observations_in",
    "examples_written",
    "examples_observed",
    "examples_default",
    "duplicate_decisions",
    "duplicate_observations",
    "observations_used",
    "observations_out_of_window",
    "observations_orphan",
)
METRICS_NAMESPACE = "loopline.join"


@dataclass(frozen=True)
class JoinedDecision:
    """One decision with its label: becomes one tf.Example.

    ``observation_offsets_ms`` holds ``to - td`` for every non-duplicate observation of this
    decision, counted or out of window; the accounting derives label delays and the alternative
    window shares from it. ``observations_used`` is how many of them fell in the label window.
    ``label_delays_ms`` holds the offsets of exactly those observations (in event-time order),
    so ``len(label_delays_ms) == observations_used``. ``join_status`` is ``observed`` when the
    label was computed from observations and ``default`` when it is the blueprint's default
    (no observation in the window carried the label's observation key, or a custom label
    function returned None).
    """

    decision: DecisionEvent
    label: int | float
    join_status: str  # OBSERVED or DEFAULT
    observations_used: int
    label_delays_ms: tuple[int, ...]  # offsets of the observations that counted toward the label
    observation_offsets_ms: tuple[int, ...]


@dataclass(frozen=True)
class UnmatchedObservation:
    """An observation not learned from: ``reason`` is ORPHAN or OUT_OF_WINDOW."""

    reason: str
    event: ObservationEvent

    def to_dict(self) -> dict:
        return {"reason": self.reason, "event": self.event.to_dict()}


class JoinOutputs(NamedTuple):
    """The PCollections the join produces; every input event lands in exactly one of them."""

    joined: object  # PCollection[JoinedDecision]
    unmatched: object  # PCollection[UnmatchedObservation]
    duplicate_decisions: object  # PCollection[DecisionEvent]
    duplicate_observations: object  # PCollection[ObservationEvent]


class GroupOutcome(NamedTuple):
    """What ``classify_decision_group`` makes of the events sharing one decision_id."""

    joined: JoinedDecision | None
    unmatched: list[UnmatchedObservation]
    duplicate_decisions: list[DecisionEvent]
    duplicate_observations: list[ObservationEvent]


# ---------------------------------------------------------------------------------------------
# The rules, as a pure function


def classify_decision_group(
    decisions: Sequence[DecisionEvent],
    observations: Sequence[ObservationEvent],
    label: Label,
    label_fn: LabelFn | None = None,
) -> GroupOutcome:
    """Applies DESIGN.md's join semantics to the events of one decision_id.

    The earliest decision is kept (ties broken by canonical JSON), the others are duplicates;
    an observation whose canonical JSON repeats an earlier one is a duplicate; each remaining
    observation counts toward the label when ``td - backward_slack <= to <= td + window``, else
    it is out of window; without a decision they are all orphans. The result never depends on
    the order of the inputs.

        >>> outcome = classify_decision_group([decision], [observation], blueprint.label)
        >>> outcome.joined.label, outcome.joined.join_status
        (1, 'observed')
    """
    unique, duplicate_observations = _dedup_observations(observations)
    if not decisions:
        return GroupOutcome(
            None, [UnmatchedObservation(ORPHAN, o) for o in unique], [], duplicate_observations
        )
    if len(decisions) == 1:
        kept, duplicate_decisions = decisions[0], []
    else:
        ordered = sorted(decisions, key=lambda d: (d.event_time_ms, _canonical_decision(d)))
        kept, duplicate_decisions = ordered[0], ordered[1:]

    td = kept.event_time_ms
    counted: list[ObservationEvent] = []
    unmatched: list[UnmatchedObservation] = []
    for o in unique:
        if label.counts(td, o.event_time_ms):
            counted.append(o)
        else:
            unmatched.append(UnmatchedObservation(OUT_OF_WINDOW, o))
    raw = compute_label(kept, counted, label, label_fn)
    if raw is None:
        value, status = label.default, DEFAULT
    else:
        value, status = cast_label(raw, label), OBSERVED
    joined = JoinedDecision(
        decision=kept,
        label=value,
        join_status=status,
        observations_used=len(counted),
        label_delays_ms=tuple(o.event_time_ms - td for o in counted),
        observation_offsets_ms=tuple(o.event_time_ms - td for o in unique),
    )
    return GroupOutcome(joined, unmatched, duplicate_decisions, duplicate_observations)


def _dedup_observations(
    observations: Sequence[ObservationEvent],
) -> tuple[list[ObservationEvent], list[ObservationEvent]]:
    """(unique in event-time order, exact repeats); the canonical JSON is the identity.

    Exact repeats share an event time, so the JSON is only computed for observations that do;
    they are ordered by it, which keeps the output independent of arrival order.
    """
    if len(observations) <= 1:
        return list(observations), []
    ordered = sorted(observations, key=_event_time)
    unique: list[ObservationEvent] = []
    duplicates: list[ObservationEvent] = []
    start, n = 0, len(ordered)
    while start < n:
        end = start + 1
        while end < n and ordered[end].event_time_ms == ordered[start].event_time_ms:
            end += 1
        if end - start == 1:
            unique.append(ordered[start])
        else:
            previous = None
            for canonical, o in sorted(
                ((_canonical(o.observations), o) for o in ordered[start:end]), key=lambda k: k[0]
            ):
                (duplicates if canonical == previous else unique).append(o)
                previous = canonical
        start = end
    return unique, duplicates


def _event_time(event: DecisionEvent | ObservationEvent) -> int:
    return event.event_time_ms


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _canonical_decision(decision: DecisionEvent) -> str:
    return _canonical(decision.to_dict())


# ---------------------------------------------------------------------------------------------
# Shuffle rows: plain tuples, which Beam's fast primitives coder encodes without pickling.

_DECISION_TAG = 0
_OBSERVATION_TAG = 1


def _decision_row(d: DecisionEvent) -> tuple[str, tuple]:
    return d.decision_id, (
        _DECISION_TAG,
        d.decision_type,
        d.event_time_ms,
        d.features,
        d.blueprint_version,
        d.decision,
        d.model_id,
        d.propensity,
    )


def _observation_row(o: ObservationEvent) -> tuple[str, tuple]:
    return o.decision_id, (_OBSERVATION_TAG, o.event_time_ms, o.observations)


class _ClassifyDecisionGroup(beam.DoFn):
    """Rebuilds the events of one decision_id and routes ``classify_decision_group``'s verdict.

    Counters are tallied per bundle and flushed once, to keep per-element overhead low.
    """

    def __init__(self, label: Label, label_fn: LabelFn | None):
        self._label = label
        self._label_fn = label_fn

    def setup(self) -> None:
        self._counters = {name: Metrics.counter(METRICS_NAMESPACE, name) for name in COUNTERS}

    def start_bundle(self) -> None:
        self._tally = dict.fromkeys(COUNTERS, 0)

    def process(self, element: tuple[str, Any]):
        decision_id, rows = element
        decisions, observations = [], []
        for row in rows:
            if row[0] == _OBSERVATION_TAG:
                observations.append(ObservationEvent(decision_id, row[1], row[2]))
            else:
                decisions.append(DecisionEvent(decision_id, *row[1:]))
        outcome = classify_decision_group(decisions, observations, self._label, self._label_fn)

        tally = self._tally
        tally["decisions_in"] += len(decisions)
        tally["observations_in"] += len(observations)
        tally["duplicate_decisions"] += len(outcome.duplicate_decisions)
        tally["duplicate_observations"] += len(outcome.duplicate_observations)
        joined = outcome.joined
        if joined is not None:
            tally["examples_written"] += 1
            tally[
                "examples_observed" if joined.join_status == OBSERVED else "examples_default"
            ] += 1
            tally["observations_used"] += joined.observations_used
            yield joined
        for unmatched in outcome.unmatched:
            tally[
                "observations_orphan"
                if unmatched.reason == ORPHAN
                else "observations_out_of_window"
            ] += 1
            yield beam.pvalue.TaggedOutput(_UNMATCHED, unmatched)
        for d in outcome.duplicate_decisions:
            yield beam.pvalue.TaggedOutput(_DUPLICATE_DECISIONS, d)
        for o in outcome.duplicate_observations:
            yield beam.pvalue.TaggedOutput(_DUPLICATE_OBSERVATIONS, o)

    def finish_bundle(self) -> None:
        for name, count in self._tally.items():
            if count:
                self._counters[name].inc(count)
        self._tally = dict.fromkeys(COUNTERS, 0)


# ---------------------------------------------------------------------------------------------
# The transform


def session_gap_ms(blueprint: Blueprint, allowed_lateness_ms: int = 0) -> int:
    """The event-time session gap the streaming join uses for ``blueprint``.

    Every observation that can count toward a decision's label lies within
    ``window + backward_slack`` of it; adding the allowed lateness keeps the session open that
    much longer, and 1 ms more makes the inclusive window end fall inside Beam's half-open
    session.
    """
    label = blueprint.label
    return label.window_ms + label.backward_slack_ms + allowed_lateness_ms + 1


class JoinDecisions(beam.PTransform):
    """Joins decisions with their observations by decision_id (DESIGN.md, "Join semantics").

    Applied to ``(decisions, observations)``, PCollections of ``DecisionEvent`` and
    ``ObservationEvent`` timestamped by event time (``ParseDecisions`` / ``ParseObservations``
    do that); returns ``JoinOutputs``. ``label_fn`` replaces the blueprint's named aggregation
    with a Python callable ``(decision, counted_observations) -> number | None`` (None means the
    default label). See the module docstring for the windowing and late data.

        >>> outputs = (decisions, observations) | "Join" >> JoinDecisions(
        ...     blueprint, label_fn=lambda d, obs: sum(o.observations.get("click", 0) for o in obs) or None)
    """

    def __init__(
        self,
        blueprint: Blueprint,
        allowed_lateness_ms: int = 0,
        windowing: str = "auto",
        label_fn: LabelFn | None = None,
    ):
        super().__init__()
        if windowing not in WINDOWINGS:
            raise ValueError(f"windowing must be one of {', '.join(WINDOWINGS)}, got {windowing!r}")
        if (
            isinstance(allowed_lateness_ms, bool)
            or not isinstance(allowed_lateness_ms, int)
            or allowed_lateness_ms < 0
        ):
            raise ValueError(
                f"allowed_lateness_ms must be a non-negative integer, got {allowed_lateness_ms!r}"
            )
        if label_fn is not None and not callable(label_fn):
            raise ValueError(
                f"label_fn must be callable (decision, observations) -> number | None, got {label_fn!r}"
            )
        self._blueprint = blueprint
        self._allowed_lateness_ms = allowed_lateness_ms
        self._windowing = windowing
        self._label_fn = label_fn

    def expand(self, pcolls) -> JoinOutputs:
        decisions, observations = pcolls
        sessions = self._windowing == "session" or (
            self._windowing == "auto" and not (decisions.is_bounded and observations.is_bounded)
        )
        decision_rows = decisions | "KeyDecisions" >> beam.Map(_decision_row).with_output_types(
            tuple[str, tuple]
        )
        observation_rows = observations | "KeyObservations" >> beam.Map(
            _observation_row
        ).with_output_types(tuple[str, tuple])
        decision_rows = self._window(decision_rows, "WindowDecisions", sessions)
        observation_rows = self._window(observation_rows, "WindowObservations", sessions)
        results = (
            (decision_rows, observation_rows)
            | "Flatten" >> beam.Flatten()
            | "CoGroupByDecisionId" >> beam.GroupByKey()
            | "Classify"
            >> beam.ParDo(
                _ClassifyDecisionGroup(self._blueprint.label, self._label_fn)
            ).with_outputs(_UNMATCHED, _DUPLICATE_DECISIONS, _DUPLICATE_OBSERVATIONS, main=_JOINED)
        )
        return JoinOutputs(
            joined=results[_JOINED],
            unmatched=results[_UNMATCHED],
            duplicate_decisions=results[_DUPLICATE_DECISIONS],
            duplicate_observations=results[_DUPLICATE_OBSERVATIONS],
        )

    def _window(self, pcoll, step: str, sessions: bool):
        if not sessions:
            if isinstance(pcoll.windowing.windowfn, window.GlobalWindows):
                return pcoll  # already global: no per-element step
            return pcoll | step >> beam.WindowInto(window.GlobalWindows())
        gap = Duration(micros=session_gap_ms(self._blueprint, self._allowed_lateness_ms) * 1000)
        return pcoll | step >> beam.WindowInto(
            window.Sessions(gap),
            trigger=trigger.DefaultTrigger(),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
            allowed_lateness=gap,
        )
