"""Label aggregation: the blueprint's named aggregations over a decision's counted observations.

Pure functions, free of Beam, so the join's DoFn stays thin and the rules are easy to test.
An observation contributes to a named aggregation only when it carries the label's
observation key with a number (a bool counts as 0/1); with none, there is no label and the
join falls back to the blueprint's default.

    >>> from loopline.events import ObservationEvent
    >>> clicks = [ObservationEvent("d1", 1_000, {"click": 1}), ObservationEvent("d1", 2_000, {"click": 0})]
    >>> aggregate_label(clicks, "click", "latest")
    0
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from loopline.blueprint import AGGREGATIONS, Label
from loopline.events import DecisionEvent, ObservationEvent

# A custom label: the decision and its counted observations (event-time order) to a number, or
# None for "no label" (the blueprint's default is used and join_status is "default").
LabelFn = Callable[[DecisionEvent, list[ObservationEvent]], "int | float | None"]


def label_value(observation: ObservationEvent, key: str) -> int | float | None:
    """The numeric value ``observation`` carries under ``key`` (bools as 0/1), else None."""
    value = observation.observations.get(key)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return value
    return None


def aggregate_label(
    observations: Sequence[ObservationEvent], key: str, aggregation: str
) -> int | float | None:
    """Aggregates the values under ``key``; None when no observation carries one.

    ``earliest`` and ``latest`` take the value of the first and last carrying observation in
    event time; observations at the same millisecond are ordered by their canonical JSON, so
    the result never depends on arrival order.
    """
    carried = [(o, v) for o in observations if (v := label_value(o, key)) is not None]
    if not carried:
        return None
    values = [v for _, v in carried]
    if aggregation == "max":
        return max(values)
    if aggregation == "min":
        return min(values)
    if aggregation == "sum":
        return sum(values)
    if aggregation == "count":
        return len(values)
    if aggregation == "mean":
        return sum(values) / len(values)
    if aggregation == "earliest":
        return _at_extreme_time(carried, min)
    if aggregation == "latest":
        return _at_extreme_time(carried, max)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")


def _at_extreme_time(carried: list[tuple[ObservationEvent, int | float]], pick: Callable) -> Any:
    moment = pick(o.event_time_ms for o, _ in carried)
    tied = [(o, v) for o, v in carried if o.event_time_ms == moment]
    if len(tied) == 1:
        return tied[0][1]
    return pick(tied, key=lambda ov: _canonical(ov[0].observations))[1]


def _canonical(observations: dict) -> str:
    return json.dumps(observations, sort_keys=True, separators=(",", ":"), default=str)


def cast_label(value: Any, label: Label) -> int | float:
    """``value`` as the blueprint's label type: int labels are rounded to the nearest integer."""
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"label {label.name!r} must be a finite number, got {value!r}")
    return int(round(value)) if label.type == "int" else float(value)


def compute_label(
    decision: DecisionEvent,
    counted: list[ObservationEvent],
    label: Label,
    label_fn: LabelFn | None = None,
) -> int | float | None:
    """The label from the counted observations (before the cast), or None for the default."""
    if label_fn is not None:
        return label_fn(decision, counted)
    if not counted:  # most decisions: nothing observed, the default label
        return None
    return aggregate_label(counted, label.observation, label.aggregation)
