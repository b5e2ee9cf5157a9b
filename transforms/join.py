"""The decision–observation join (DESIGN.md, "Join semantics").

``JoinDecisions`` keys logged decisions and their delayed observations by ``decision_id``,
groups them (a CoGroupByKey over event-time windows), and classifies each group with the pure
function ``classify_decision_group``: one ``JoinedDecision`` per decision, every other input
event on exactly one of the other outputs.

    >>> decisions, observations = ...  # PCollections of DecisionEvent / ObservationEvent
    >>> joined = (decisions, observations) | JoinDecisions(blueprint)
    >>> joined.joined        # JoinedDecision, one per decision_id
    >>> joined.unmatched     # UnmatchedObservation: orphan, out_of_window, late_observation
    >>> joined.out_of_range  # ObservationEvent: no decision here, outside the span's own range

Day boundaries (batch). A daily span's decisions are one day's, but their labels need the next
day's observations too. ``observation_range`` names the event-time range ``[start, end)`` of
the span's *own* observations (normally the decisions' day): an observation of a decision in
this join is classified as always, whatever its time; one with no decision here is an
``orphan`` only inside the range, and outside it ``out_of_range``: it belongs to a
neighbouring day's span (whose own join matches it or calls it an orphan), so it is counted
but written nowhere.

Windowing. In batch (bounded inputs, ``windowing="auto"``) the join groups over all time in
the global window, which is exact. On unbounded inputs the same CoGroupByKey runs over
event-time session windows per ``decision_id``, behind a stateful gate (``_SessionGate``):

* the gate, keyed by ``decision_id`` in the global window, lets a key's events through while
  its session is open: until the watermark passes its latest event time plus the gap
  ``window + backward_slack + allowed_lateness`` (plus 1 ms: Beam's sessions are half-open and
  the label window is inclusive). An observation arriving up to ``allowed_lateness`` late is
  still classified exactly (DESIGN.md: "the join keeps a decision open for window +
  allowed_lateness");
* the sessions of the grouping are twice that gap, so everything the gate let through is in
  its group when the grouping fires once, at the watermark (default trigger, discarding):
  each decision is emitted once, with the label batch would give it. The gate keys what it
  lets through by ``(decision_id, start of the gate's session)``, so a later session of the
  same decision_id never merges into one that has fired;
* once a session with a decision has ended, the gate answers for the key itself, for one more
  gap (the TTL, at least window + allowed lateness): a redelivered or repeated decision is a
  ``duplicate_decision``, an observation that would have counted is a ``late_observation``
  (to ``unmatched_observations/``), others ``out_of_window`` or ``duplicate_observation``.
  Nothing of a closed decision reaches the grouping again, so no example is written twice
  and no late element opens a session behind the watermark;
* after the TTL the key is forgotten; an event for it later still is beyond the horizon
  (an observation is reported ``orphan``). On a Pub/Sub source such an event is more than
  the allowed lateness behind its publish time and never gets here: ``transforms.streaming``
  sends it to ``late/`` (DESIGN.md: "an event behind the watermark by more than the allowed
  lateness goes to late/").

Why not the plain session-window CoGroupByKey (what this join was): an event arriving after
its decision's session fired either re-emitted the decision (at-least-once delivery writes
examples twice) or, merging into a fired session on the Python DirectRunner, left watermark
holds that were never released (the job stalled for good; apache/beam#19736, #21260). And why
not a stateful DoFn alone: the Python DirectRunner's user timers hold no output watermark
(``direct_userstate``: "add corresponding watermark holds"), so whatever a timer emits can be
dropped as late by the next windowed step; the grouping's panes are held properly. The gate
emits only from ``process``, timestamped ``gap`` after the event (where its session would have
ended), ahead of the watermark for any event within the allowed lateness.

``windowing="session"`` forces the streaming path in batch too (the batch/streaming comparison
test uses it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Duration, Timestamp

from loopline.blueprint import Blueprint, Label
from loopline.events import DecisionEvent, ObservationEvent
from loopline.vocabulary import JoinStatus, Unmatched
from transforms.labels import LabelFn, cast_label, compute_label

# Join statuses and unmatched reasons (loopline.vocabulary), by their short names.
OBSERVED, DEFAULT = JoinStatus.OBSERVED, JoinStatus.DEFAULT
ORPHAN, OUT_OF_WINDOW = Unmatched.ORPHAN, Unmatched.OUT_OF_WINDOW
LATE_OBSERVATION, OUT_OF_RANGE = Unmatched.LATE_OBSERVATION, Unmatched.OUT_OF_RANGE

WINDOWINGS = ("auto", "global", "session")

# Names of the outputs of the classification step; also the counters' names.
_JOINED = "joined"
_UNMATCHED = "unmatched"
_DUPLICATE_DECISIONS = "duplicate_decisions"
_DUPLICATE_OBSERVATIONS = "duplicate_observations"
_OUT_OF_RANGE = "out_of_range"

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
    "observations_late",
    "observations_out_of_range",
)
METRICS_NAMESPACE = "loopline.join"
_UNMATCHED_COUNTERS = {
    ORPHAN: "observations_orphan",
    OUT_OF_WINDOW: "observations_out_of_window",
    LATE_OBSERVATION: "observations_late",
}


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
    """An observation not learned from: ``reason`` is ORPHAN, OUT_OF_WINDOW or (streaming)
    LATE_OBSERVATION: it would have counted, but arrived after its decision was emitted."""

    reason: str
    event: ObservationEvent

    def to_dict(self) -> dict:
        return {"reason": self.reason, "event": self.event.to_dict()}


class ObservationRange(NamedTuple):
    """The event-time range ``[start_ms, end_ms)`` of a span's own observations; None leaves
    that side open. An observation with no decision in the join is an orphan only inside it.

    >>> ObservationRange(0, 10).contains(10)
    False
    """

    start_ms: int | None = None
    end_ms: int | None = None

    def contains(self, event_time_ms: int) -> bool:
        return (self.start_ms is None or self.start_ms <= event_time_ms) and (
            self.end_ms is None or event_time_ms < self.end_ms
        )


ALL_TIME = ObservationRange()


class JoinOutputs(NamedTuple):
    """The PCollections the join produces; every input event lands in exactly one of them."""

    joined: object  # PCollection[JoinedDecision]
    unmatched: object  # PCollection[UnmatchedObservation]: orphan, out_of_window, late_observation
    duplicate_decisions: object  # PCollection[DecisionEvent]
    duplicate_observations: object  # PCollection[ObservationEvent]
    out_of_range: object  # PCollection[ObservationEvent]: no decision here, not the span's own


class GroupOutcome(NamedTuple):
    """What ``classify_decision_group`` makes of the events sharing one decision_id."""

    joined: JoinedDecision | None
    unmatched: list[UnmatchedObservation]
    duplicate_decisions: list[DecisionEvent]
    duplicate_observations: list[ObservationEvent]
    out_of_range: Sequence[ObservationEvent] = ()


# ---------------------------------------------------------------------------------------------
# The rules, as a pure function


def classify_decision_group(
    decisions: Sequence[DecisionEvent],
    observations: Sequence[ObservationEvent],
    label: Label,
    label_fn: LabelFn | None = None,
    observation_range: ObservationRange = ALL_TIME,
) -> GroupOutcome:
    """Applies DESIGN.md's join semantics to the events of one decision_id.

    The earliest decision is kept (ties broken by canonical JSON), the others are duplicates;
    an observation whose canonical JSON repeats an earlier one is a duplicate; each remaining
    observation counts toward the label when ``td - backward_slack <= to <= td + window``, else
    it is out of window; without a decision they are orphans, or ``out_of_range`` when their
    event time is outside ``observation_range``. The result never depends on the order of the
    inputs.

        >>> outcome = classify_decision_group([decision], [observation], blueprint.label)
        >>> outcome.joined.label, outcome.joined.join_status
        (1, 'observed')
    """
    unique, duplicate_observations = _dedup_observations(observations)
    if not decisions:
        orphans = [o for o in unique if observation_range.contains(o.event_time_ms)]
        out_of_range = [o for o in unique if not observation_range.contains(o.event_time_ms)]
        return GroupOutcome(
            None,
            [UnmatchedObservation(ORPHAN, o) for o in orphans],
            [],
            duplicate_observations,
            out_of_range,
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
#
# A decision's features travel as a tuple of their values in the blueprint's order, not as
# their dict: the in-memory runner encodes and decodes each shuffled row twice, and decoding a
# dict of ten named features costs about 3 us more each time than decoding the tuple. Features
# that are not exactly the blueprint's (an event parsed without one) travel as their dict.

_DECISION_TAG = 0
_OBSERVATION_TAG = 1


class _ShuffleRows:
    """Events to shuffle rows ``(decision_id, row)`` and back, for one blueprint's features."""

    def __init__(self, feature_names: tuple[str, ...]):
        self._names = feature_names

    def decision_row(self, d: DecisionEvent) -> tuple[str, tuple]:
        return d.decision_id, (
            _DECISION_TAG,
            d.decision_type,
            d.event_time_ms,
            self._packed(d.features),
            d.blueprint_version,
            d.decision,
            d.model_id,
            d.propensity,
            d.score,
            d.arm,
        )

    @staticmethod
    def observation_row(o: ObservationEvent) -> tuple[str, tuple]:
        return o.decision_id, (_OBSERVATION_TAG, o.event_time_ms, o.observations)

    def decision(self, decision_id: str, row: tuple) -> DecisionEvent:
        features = row[3]
        if type(features) is tuple:
            features = dict(zip(self._names, features, strict=True))
        return DecisionEvent(decision_id, row[1], row[2], features, *row[4:])

    def events(self, decision_id: str, rows) -> tuple[list[DecisionEvent], list[ObservationEvent]]:
        decisions, observations = [], []
        for row in rows:
            if row[0] == _OBSERVATION_TAG:
                observations.append(ObservationEvent(decision_id, row[1], row[2]))
            else:
                decisions.append(self.decision(decision_id, row))
        return decisions, observations

    def _packed(self, features: dict) -> tuple | dict:
        names = self._names
        if len(features) != len(names):
            return features
        try:
            return tuple([features[name] for name in names])
        except KeyError:
            return features


def _route(outcome: GroupOutcome, n_decisions: int, n_observations: int, tally: dict):
    """Yields ``outcome`` on the join's outputs and adds its counts to ``tally``."""
    tally["decisions_in"] += n_decisions
    tally["observations_in"] += n_observations
    tally["duplicate_decisions"] += len(outcome.duplicate_decisions)
    tally["duplicate_observations"] += len(outcome.duplicate_observations)
    joined = outcome.joined
    if joined is not None:
        tally["examples_written"] += 1
        tally["examples_observed" if joined.join_status == OBSERVED else "examples_default"] += 1
        tally["observations_used"] += joined.observations_used
        yield joined
    for unmatched in outcome.unmatched:
        tally[_UNMATCHED_COUNTERS[unmatched.reason]] += 1
        yield beam.pvalue.TaggedOutput(_UNMATCHED, unmatched)
    for d in outcome.duplicate_decisions:
        yield beam.pvalue.TaggedOutput(_DUPLICATE_DECISIONS, d)
    for o in outcome.duplicate_observations:
        yield beam.pvalue.TaggedOutput(_DUPLICATE_OBSERVATIONS, o)
    tally["observations_out_of_range"] += len(outcome.out_of_range)
    for o in outcome.out_of_range:
        yield beam.pvalue.TaggedOutput(_OUT_OF_RANGE, o)


class _ClassifyDecisionGroup(beam.DoFn):
    """Rebuilds the events of one decision_id and routes ``classify_decision_group``'s verdict.

    Counters are tallied per bundle and flushed once, to keep per-element overhead low.
    """

    def __init__(
        self,
        rows: _ShuffleRows,
        label: Label,
        label_fn: LabelFn | None,
        observation_range: ObservationRange,
    ):
        self._rows = rows
        self._label = label
        self._label_fn = label_fn
        self._observation_range = observation_range

    def setup(self) -> None:
        self._counters = {name: Metrics.counter(METRICS_NAMESPACE, name) for name in COUNTERS}

    def start_bundle(self) -> None:
        self._tally = dict.fromkeys(COUNTERS, 0)

    def process(self, element: tuple[Any, Any]):
        key, rows = element
        decision_id = key[0] if isinstance(key, tuple) else key  # streaming: (id, session)
        decisions, observations = self._rows.events(decision_id, rows)
        outcome = classify_decision_group(
            decisions, observations, self._label, self._label_fn, self._observation_range
        )
        yield from _route(outcome, len(decisions), len(observations), self._tally)

    def finish_bundle(self) -> None:
        for name, count in self._tally.items():
            if count:
                self._counters[name].inc(count)
        self._tally = dict.fromkeys(COUNTERS, 0)


def _row_time(row: tuple) -> int:
    return row[1] if row[0] == _OBSERVATION_TAG else row[2]


def _observation_identity(event_time_ms: int, observations: Any) -> str:
    """What makes two observations exact repeats (as ``_dedup_observations`` decides)."""
    return f"{event_time_ms}|{_canonical(observations)}"


_OPENED_AT = ReadModifyWriteStateSpec("opened_at", coders.VarIntCoder())
_DECISION_TIME = ReadModifyWriteStateSpec("decision_time", coders.VarIntCoder())
_CLOSES_AT = ReadModifyWriteStateSpec("closes_at", coders.VarIntCoder())
_CLOSED = ReadModifyWriteStateSpec("closed", coders.BooleanCoder())
_SEEN = BagStateSpec("seen_observations", coders.StrUtf8Coder())
_TIMER = TimerSpec("session", TimeDomain.WATERMARK)
# The DoFn parameters that hand them over (module singletons: Beam matches them by default).
_OPENED_AT_PARAM = beam.DoFn.StateParam(_OPENED_AT)
_DECISION_TIME_PARAM = beam.DoFn.StateParam(_DECISION_TIME)
_CLOSES_AT_PARAM = beam.DoFn.StateParam(_CLOSES_AT)
_CLOSED_PARAM = beam.DoFn.StateParam(_CLOSED)
_SEEN_PARAM = beam.DoFn.StateParam(_SEEN)
_TIMER_PARAM = beam.DoFn.TimerParam(_TIMER)


class _SessionGate(beam.DoFn):
    """Keyed by decision_id: lets a key's events into the grouping until its session ends,
    then answers for the key itself, so a decision is never grouped (and emitted) twice.

    Open: an event passes through, keyed by ``(decision_id, opened_at)`` (the event time of
    the session's first event), so the grouping never merges it into a session of the same
    decision_id that has already fired; the gate remembers the earliest decision time, the
    identities of the observations, and the session's end (latest event time + gap), where
    its one event-time timer stands.

    Closed (the watermark passed the session's end and the session had a decision): events
    no longer pass. For ``gap`` more of event time (the TTL: at least window + allowed
    lateness) each is classified against what the gate remembers: a decision is
    ``duplicate_decision`` (a redelivery); an observation is ``duplicate_observation`` (an
    exact repeat), ``late_observation`` (it would have counted toward the label) or
    ``out_of_window``. Those outputs are timestamped ``gap`` after the event, where its session
    would have ended. At the TTL the key is forgotten. A session of observations alone leaves
    nothing behind: the grouping reports them ``orphan``.
    """

    def __init__(self, rows: _ShuffleRows, label: Label, gap_ms: int):
        self._rows = rows
        self._label = label
        self._gap_ms = gap_ms

    def process(
        self,
        element: tuple[str, tuple],
        opened_at=_OPENED_AT_PARAM,
        decision_time=_DECISION_TIME_PARAM,
        closes_at=_CLOSES_AT_PARAM,
        closed=_CLOSED_PARAM,
        seen=_SEEN_PARAM,
        timer=_TIMER_PARAM,
    ):
        decision_id, row = element
        event_time = _row_time(row)
        if closed.read():
            moment = _timestamp(event_time + self._gap_ms)
            for output in self._after_close(decision_id, row, decision_time.read(), seen):
                yield _timestamped(output, moment)
            return
        session = opened_at.read()
        if session is None:
            session = event_time
            opened_at.write(session)
        if row[0] == _OBSERVATION_TAG:
            seen.add(_observation_identity(row[1], row[2]))
        else:
            td = decision_time.read()
            if td is None or event_time < td:
                decision_time.write(event_time)
        end = event_time + self._gap_ms
        current = closes_at.read()
        if current is None or end > current:
            closes_at.write(end)
            timer.set(_timestamp(end))
        yield (decision_id, session), row

    def _after_close(self, decision_id: str, row: tuple, td: int, seen):
        if row[0] != _OBSERVATION_TAG:
            yield beam.pvalue.TaggedOutput(
                _DUPLICATE_DECISIONS, self._rows.decision(decision_id, row)
            )
            return
        observation = ObservationEvent(decision_id, row[1], row[2])
        identity = _observation_identity(row[1], row[2])
        if identity in set(seen.read()):
            yield beam.pvalue.TaggedOutput(_DUPLICATE_OBSERVATIONS, observation)
            return
        seen.add(identity)
        reason = LATE_OBSERVATION if self._label.counts(td, row[1]) else OUT_OF_WINDOW
        yield beam.pvalue.TaggedOutput(_UNMATCHED, UnmatchedObservation(reason, observation))

    @on_timer(_TIMER)
    def on_session_end(
        self,
        opened_at=_OPENED_AT_PARAM,
        decision_time=_DECISION_TIME_PARAM,
        closes_at=_CLOSES_AT_PARAM,
        closed=_CLOSED_PARAM,
        seen=_SEEN_PARAM,
        timer=_TIMER_PARAM,
    ):
        end = closes_at.read()
        if closed.read() or decision_time.read() is None:
            # The TTL is over, or the session had no decision: forget the key.
            for state in (opened_at, decision_time, closes_at, closed, seen):
                state.clear()
            return
        opened_at.clear()
        closed.write(True)
        timer.set(_timestamp(end + self._gap_ms))


class _CountAfterClose(beam.DoFn):
    """Counts what ``_SessionGate`` answered for a closed decision (on one of its outputs).

    A separate step because the Python DirectRunner reports no metrics of a stateful DoFn.
    """

    _COUNTERS = {
        _DUPLICATE_DECISIONS: ("decisions_in", "duplicate_decisions"),
        _DUPLICATE_OBSERVATIONS: ("observations_in", "duplicate_observations"),
    }

    def __init__(self, tag: str):
        self._tag = tag

    def setup(self) -> None:
        self._counters = {name: Metrics.counter(METRICS_NAMESPACE, name) for name in COUNTERS}

    def process(self, element: Any):
        if self._tag == _UNMATCHED:
            names = ("observations_in", _UNMATCHED_COUNTERS[element.reason])
        else:
            names = self._COUNTERS[self._tag]
        for name in names:
            self._counters[name].inc()
        yield element


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


def _timestamped(output: Any, moment: Timestamp) -> Any:
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, window.TimestampedValue(output.value, moment))
    return window.TimestampedValue(output, moment)


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
    default label). ``observation_range`` bounds the span's own observations (module
    docstring, "Day boundaries"). See the module docstring for the windowing and late data.

        >>> outputs = (decisions, observations) | "Join" >> JoinDecisions(
        ...     blueprint, label_fn=lambda d, obs: sum(o.observations.get("click", 0) for o in obs) or None)
    """

    def __init__(
        self,
        blueprint: Blueprint,
        allowed_lateness_ms: int = 0,
        windowing: str = "auto",
        label_fn: LabelFn | None = None,
        observation_range: ObservationRange = ALL_TIME,
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
        self._observation_range = ObservationRange(*observation_range)

    def expand(self, pcolls) -> JoinOutputs:
        decisions, observations = pcolls
        streaming = self._windowing == "session" or (
            self._windowing == "auto" and not (decisions.is_bounded and observations.is_bounded)
        )
        shuffle_rows = _ShuffleRows(self._blueprint.feature_names)
        decision_rows = decisions | "KeyDecisions" >> beam.Map(
            shuffle_rows.decision_row
        ).with_output_types(tuple[str, tuple])
        observation_rows = observations | "KeyObservations" >> beam.Map(
            shuffle_rows.observation_row
        ).with_output_types(tuple[str, tuple])
        rows = (
            self._global(decision_rows, "WindowDecisions"),
            self._global(observation_rows, "WindowObservations"),
        ) | "Flatten" >> beam.Flatten()
        label = self._blueprint.label
        tags = (_UNMATCHED, _DUPLICATE_DECISIONS, _DUPLICATE_OBSERVATIONS)
        if streaming:
            gap_ms = session_gap_ms(self._blueprint, self._allowed_lateness_ms)
            gate = beam.ParDo(_SessionGate(shuffle_rows, label, gap_ms)).with_output_types(
                tuple[tuple[str, int], tuple]
            )
            gated = rows | "SessionGate" >> gate.with_outputs(*tags, main=_JOINED)
            sessions = beam.WindowInto(
                window.Sessions(Duration(micros=2 * gap_ms * 1000)),
                trigger=trigger.DefaultTrigger(),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(micros=gap_ms * 1000),
            )
            rows = gated[_JOINED] | "WindowSessions" >> sessions
        results = (
            rows
            | "CoGroupByDecisionId" >> beam.GroupByKey()
            | "Classify"
            >> beam.ParDo(
                _ClassifyDecisionGroup(shuffle_rows, label, self._label_fn, self._observation_range)
            ).with_outputs(*tags, _OUT_OF_RANGE, main=_JOINED)
        )
        if not streaming:
            return JoinOutputs(*(results[tag] for tag in (_JOINED, *tags, _OUT_OF_RANGE)))
        return JoinOutputs(
            results[_JOINED],
            *(
                (
                    results[tag],
                    gated[tag]
                    | f"CountAfterClose[{tag}]" >> beam.ParDo(_CountAfterClose(tag))
                    | f"WindowGated[{tag}]" >> sessions,
                )
                | f"Flatten[{tag}]" >> beam.Flatten()
                for tag in tags
            ),
            results[_OUT_OF_RANGE],
        )

    @staticmethod
    def _global(pcoll, step: str):
        if isinstance(pcoll.windowing.windowfn, window.GlobalWindows):
            return pcoll  # already global: no per-element step
        return pcoll | step >> beam.WindowInto(window.GlobalWindows())
