"""The decision–observation join (DESIGN.md, "Join semantics").

INTERFACE STUB, being filled in: the types below are the contract between the join and the
stages after it (example encoding, span writing, accounting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from loopline.events import DecisionEvent, ObservationEvent

OBSERVED = "observed"
DEFAULT = "default"
ORPHAN = "orphan"
OUT_OF_WINDOW = "out_of_window"


@dataclass(frozen=True)
class JoinedDecision:
    """One decision with its label: becomes one tf.Example.

    ``observation_offsets_ms`` holds ``to - td`` for every non-duplicate observation of this
    decision, counted or out of window; the accounting derives label delays and the alternative
    window shares from it. ``observations_used`` is how many of them fell in the label window.
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
