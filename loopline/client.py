"""The decision client: the in-process API a product service calls (DESIGN.md, "The loop").

``get_decision`` scores the context with a pluggable scorer, applies the blueprint's policy
(or the blueprint's fallback decision while no model is available) and logs a decision event
holding exactly the features it used. ``log_observations`` logs what happened afterwards.

    >>> client = DecisionClient(load_blueprint("examples/notify.yaml"), JsonLinesSink("LOGS"))
    >>> client.get_decision("d-1", context).decision       # no scorer yet: the fallback
    1
    >>> client.log_observations("d-1", {"click": 1})

A pushed model is scored with ``loopline.scorer.SavedModelScorer`` (TensorFlow is imported
when it loads a model); nothing here imports Beam.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loopline.blueprint import Blueprint
from loopline.events import (
    DeadLetter,
    DecisionEvent,
    ObservationEvent,
    observation_from_record,
    validate_features,
)
from loopline.experiment import CHALLENGER, PRODUCTION, assign_arm
from loopline.policy import FallbackPolicy, Policy, policy_from_blueprint
from loopline.sinks import EventSink

log = logging.getLogger(__name__)

Scorer = Callable[[dict[str, Any]], float]


@dataclass(frozen=True)
class Decision:
    """What ``get_decision`` returns to the product.

    ``score`` and ``model_id`` are None when the fallback decided; ``event`` is the decision
    event that was logged; ``arm`` is the rollout arm that served it (None without a
    challenger).
    """

    decision: Any
    score: float | None
    propensity: float
    model_id: str | None
    explored: bool
    event: DecisionEvent | None = field(default=None, repr=False, compare=False)
    arm: str | None = None


class DecisionClient:
    """Makes and logs decisions of one blueprint; safe to share between threads.

    ``scorer`` is any callable from the features to a float (a ``model_id`` attribute on it
    names the model; ``model_id`` here overrides it). Without a scorer every decision is the
    blueprint's fallback with propensity 1. A scorer that raises or returns a non-finite number
    does not fail the product's request: that decision falls back too, and ``stats`` counts it.

    ``clock`` returns epoch seconds (``time.time`` by default).

    During a rollout, ``challenger`` scores the blueprint's ``rollout.challenger_share`` of
    units (``challenger_model_id`` names it, else its ``model_id`` attribute): each decision's
    unit, the raw value of the feature ``rollout.unit``, goes to an arm by
    ``loopline.experiment.assign_arm``, so a unit keeps its arm in every process and on every
    day, whatever either model scores. The arm's scorer (or, for the production arm without a
    ``scorer``, the fallback) decides, and the event carries ``arm``. A scorer that fails falls
    back within its arm: the event keeps the arm, so a broken challenger shows in its own
    arm's figures. A decision whose unit has no usable value (not a non-empty string or an
    int) goes to production. Without a challenger no event carries an arm: all traffic is
    production's and there is no experiment to read.
    """

    def __init__(
        self,
        blueprint: Blueprint,
        sink: EventSink,
        scorer: Scorer | None = None,
        policy: Policy | None = None,
        model_id: str | None = None,
        clock: Callable[[], float] = time.time,
        challenger: Scorer | None = None,
        challenger_model_id: str | None = None,
    ):
        self.blueprint = blueprint
        self.sink = sink
        self.scorer = scorer
        self.policy = policy if policy is not None else policy_from_blueprint(blueprint)
        self.fallback = FallbackPolicy.from_blueprint(blueprint)
        self.model_id = model_id if model_id is not None else getattr(scorer, "model_id", None)
        self.clock = clock
        self._lock = threading.Lock()
        self.stats = {"decisions": 0, "fallbacks": 0, "scorer_errors": 0, "observations": 0}
        self.challenger = challenger
        self.challenger_model_id = (
            challenger_model_id
            if challenger_model_id is not None
            else getattr(challenger, "model_id", None)
        )
        if challenger is not None and blueprint.rollout is None:
            raise ValueError(
                f"a challenger needs a rollout section in blueprint {blueprint.name} "
                "(the unit and share that assign decisions to it)"
            )

    def get_decision(self, decision_id: str, context: Mapping[str, Any]) -> Decision:
        """Decides for one context and logs it; ValueError if the context breaks the blueprint.

        ``context`` must hold exactly the blueprint's features with their declared types.
        """
        if not isinstance(decision_id, str) or not decision_id:
            raise ValueError(f"decision_id must be a non-empty string, got {decision_id!r}")
        if not isinstance(context, Mapping):
            raise ValueError(f"context must be a mapping of features, got {type(context).__name__}")
        problem = validate_features(dict(context), self.blueprint)
        if problem:
            reason, detail = problem
            raise ValueError(f"context for decision {decision_id!r}: {detail} ({reason})")
        # A copy (validated values are scalars or lists of scalars): what is logged is what was
        # scored, even if the caller mutates its context afterwards.
        features = {k: list(v) if isinstance(v, list) else v for k, v in context.items()}
        event_time_ms = int(round(self.clock() * 1000))

        arm = self._arm(features)
        scorer, arm_model_id = self.scorer, self.model_id
        if arm == CHALLENGER:
            scorer, arm_model_id = self.challenger, self.challenger_model_id
        score = self._score(decision_id, features, scorer)
        if score is None:
            choice, model_id = self.fallback.choose(math.nan, decision_id), None
        else:
            choice, model_id = self.policy.choose(score, decision_id), arm_model_id
        event = DecisionEvent(
            decision_id=decision_id,
            decision_type=self.blueprint.name,
            event_time_ms=event_time_ms,
            features=features,
            blueprint_version=self.blueprint.version,
        ).with_choice(choice.decision, choice.propensity, model_id, score=score, arm=arm)
        self.sink.write(event)
        self._count("decisions", "fallbacks" if score is None else None)
        return Decision(
            choice.decision, score, event.propensity, model_id, choice.explored, event, arm
        )

    def log_observations(
        self,
        decision_id: str,
        observations: Mapping[str, Any],
        event_time_ms: int | None = None,
    ) -> ObservationEvent:
        """Logs what happened after a decision (now, or at ``event_time_ms``); returns the event.

        ValueError when the observation would be refused downstream (e.g. a non-numeric label).
        """
        if event_time_ms is None:
            event_time_ms = int(round(self.clock() * 1000))
        record = {
            "decision_id": decision_id,
            "event_time": event_time_ms,
            "observations": dict(observations)
            if isinstance(observations, Mapping)
            else observations,
        }
        event = observation_from_record(record, self.blueprint)
        if isinstance(event, DeadLetter):
            raise ValueError(
                f"observation for decision {decision_id!r}: {event.detail} ({event.reason})"
            )
        self.sink.write(event)
        self._count("observations")
        return event

    def _arm(self, features: dict[str, Any]) -> str | None:
        """The decision's arm while a challenger serves (None without one)."""
        if self.challenger is None:
            return None
        unit = features.get(self.blueprint.rollout.unit)
        if isinstance(unit, bool) or not isinstance(unit, str | int) or unit == "":
            return PRODUCTION
        return assign_arm(unit, self.blueprint.rollout)

    def _score(
        self, decision_id: str, features: dict[str, Any], scorer: Scorer | None = None
    ) -> float | None:
        """The score of ``scorer`` (default ``self.scorer``), or None when there is none or it
        failed."""
        scorer = self.scorer if scorer is None else scorer
        if scorer is None:
            return None
        try:
            score = float(scorer(features))
            if not math.isfinite(score):
                raise ValueError(f"the scorer returned {score!r}")
        except Exception:  # noqa: BLE001 - a broken model must not fail the product's request
            log.warning(
                "scoring decision %r failed; using the fallback", decision_id, exc_info=True
            )
            self._count("scorer_errors")
            return None
        return score

    def _count(self, *keys: str | None) -> None:
        with self._lock:
            for key in keys:
                if key:
                    self.stats[key] += 1
