"""Scoring a rollout: each decision's unit goes to an arm, each arm's rows are scored by that
arm's model, all models in ONE RunInference (Beam's ``KeyedModelHandler`` with a
``KeyModelMapping`` per arm), and an arm without a model gets the blueprint's fallback decision.

    outputs = batches | ScoreArms(
        {"production": SavedModelHandler(production), "challenger": SavedModelHandler(challenger)},
        DecisionEncoder(blueprint, key), policy, FallbackPolicy.from_blueprint(blueprint),
        blueprint.rollout,
    )
    outputs.scored   # lists of ScoredDecision, each carrying its arm
    outputs.failed   # DeadLetter

The arm is the decision client's (``loopline.client.DecisionClient``): ``unit_arm`` hashes the
raw value of the rollout's unit feature with ``loopline.experiment.assign_arm``, so a unit is in
the same arm whether the client or bulk scoring decides for it. It needs the decision event
(the join's TFRecord examples hold the unit pseudonymised), so rows without one go to
production; ``pipelines.bulk_score`` refuses TFRecord input while a challenger serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference

from loopline.blueprint import Rollout
from loopline.experiment import PRODUCTION, assign_arm
from loopline.policy import Policy
from transforms.batch_coder import RowBatch
from transforms.encoding import FAILED, DecisionEncoder, EncodedDecision, EncodeDecisions
from transforms.inference import ScoringOutputs
from transforms.model_handler import (
    METRICS_NAMESPACE,
    BatchAsOneElement,
    SavedModelHandler,
    models_by_arm,
)
from transforms.policy_step import ApplyArmPolicy, utc_now
from transforms.scoring_failures import inference_failures

FALLBACK = "fallback"
ArmRow = tuple[str | None, tuple[str, Any]]  # (arm, (decision_id, EncodedDecision | result))


def unit_arm(features: Mapping[str, Any], rollout: Rollout) -> str:
    """The arm of a decision with these (raw) features: the decision client's rule.

    ``assign_arm`` of the unit feature's value; a decision whose unit has no usable value (not
    a non-empty string or an int) goes to production, as the client sends it.

        >>> unit_arm({"user_id": "u-1"}, rollout) == assign_arm("u-1", rollout)
        True
    """
    unit = features.get(rollout.unit)
    if isinstance(unit, bool) or not isinstance(unit, str | int) or unit == "":
        return PRODUCTION
    return assign_arm(unit, rollout)


def assign_rows(
    rows: Sequence[tuple[str, EncodedDecision]], rollout: Rollout | None, served: frozenset[str]
) -> tuple[dict[str | None, list[ArmRow]], dict[str | None, list[ArmRow]]]:
    """A batch's rows split by arm: ``(to score, to fall back)``, each ``{arm: rows}``.

    Without ``rollout`` (no challenger in traffic) no row has an arm and every row is
    production's. A row is scored when its arm (production without one) is in ``served``; a
    row to fall back keeps a PredictionResult with no score, for the policy step.
    """
    scored: dict[str | None, list[ArmRow]] = {}
    fallback: dict[str | None, list[ArmRow]] = {}
    for decision_id, encoded in rows:
        event = encoded.event
        arm = None
        if rollout is not None:
            arm = PRODUCTION if event is None else unit_arm(event.features, rollout)
        if (arm or PRODUCTION) in served:
            scored.setdefault(arm, []).append((arm, (decision_id, encoded)))
        else:
            result = PredictionResult(encoded, None, None)
            fallback.setdefault(arm, []).append((arm, (decision_id, result)))
    return scored, fallback


class AssignArms(beam.DoFn):
    """A batch of ``(decision_id, EncodedDecision)`` to one list per arm of ``(arm,
    (decision_id, EncodedDecision))`` for the arms a model serves, and (tagged ``fallback``)
    one list per arm of ``(arm, (decision_id, PredictionResult without a score))`` for the
    others (``assign_rows``)."""

    def __init__(self, rollout: Rollout | None, served: Iterable[str]):
        self._rollout = rollout
        self._served = frozenset(served)

    def process(self, batch: Sequence[tuple[str, EncodedDecision]]):
        scored, fallback = assign_rows(batch, self._rollout, self._served)
        for rows in scored.values():
            yield rows
        for rows in fallback.values():
            yield beam.pvalue.TaggedOutput(FALLBACK, rows)


def arm_inference_failures(failed: tuple) -> Iterable:
    """``inference_failures`` for a batch of arm rows whose model call raised."""
    batch, error = failed
    return inference_failures(([row for _, row in batch], error))


class ScoreArms(beam.PTransform):
    """Scores batches of keyed decisions with the model of each row's arm, and decides.

    ``handlers`` maps an arm (``production``, ``challenger``) to the handler of its model; an
    arm left out has none, and its rows get ``fallback``'s decision (no score, no model id).
    ``rollout`` assigns the arms; None (no challenger in traffic) puts every row in
    production without an arm, as the decision client does. Input and output as
    ``ScoreBatches``: lists of ``(decision_id, DecisionEvent | bytes)`` in, ``ScoringOutputs``
    out, every ScoredDecision carrying its ``arm``. Row policies only (not top-k).

        outputs = batches | ScoreArms({"challenger": handler}, encoder, policy, fallback, rollout)
    """

    def __init__(
        self,
        handlers: Mapping[str, SavedModelHandler],
        encoder: DecisionEncoder,
        policy: Policy,
        fallback: Policy,
        rollout: Rollout | None,
        clock=utc_now,
    ):
        super().__init__()
        self._handlers = dict(handlers)
        self._encoder = encoder
        self._policy = policy
        self._fallback = fallback
        self._rollout = rollout
        self._clock = clock

    def expand(self, batches: beam.PCollection) -> ScoringOutputs:
        encoded = batches | "EncodeDecisions" >> beam.ParDo(
            EncodeDecisions(self._encoder)
        ).with_output_types(RowBatch).with_outputs(FAILED, main="encoded")
        arms = encoded.encoded | "AssignArms" >> beam.ParDo(
            AssignArms(self._rollout, self._handlers)
        ).with_output_types(RowBatch).with_outputs(FALLBACK, main="scored")
        decided = [arms[FALLBACK]]
        failures = [encoded[FAILED]]
        if self._handlers:
            handler = BatchAsOneElement(models_by_arm(self._handlers))
            results, dead = (
                arms.scored
                | "RunInference"
                >> RunInference(
                    handler, metrics_namespace=METRICS_NAMESPACE
                ).with_exception_handling()
            )
            results.element_type = RowBatch  # one list of results per arm's rows of a batch
            decided.append(results)
            failures.append(
                dead.failed_inferences | "InferenceFailures" >> beam.FlatMap(arm_inference_failures)
            )
        scored = (
            tuple(decided)
            | "AllArms" >> beam.Flatten()
            | "ApplyPolicy"
            >> beam.ParDo(
                ApplyArmPolicy(self._policy, self._fallback, self._clock)
            ).with_output_types(RowBatch)
        )
        failed = tuple(failures) | "AllFailures" >> beam.Flatten()
        return ScoringOutputs(scored, failed)
