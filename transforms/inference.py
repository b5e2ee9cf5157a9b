"""Scoring decisions with the pushed model: encode, RunInference, apply the policy, in batches.

The pushed model (DESIGN.md, "Model serving contract") is a TF SavedModel whose
``serving_default(examples: tf.string[None]) -> {"score": float32[None]}`` takes serialized raw
``tf.Example``s; decisions are encoded the way the join encodes them for training
(``transforms.encoding``).

    handler = SavedModelHandler(serving_model, min_batch_size=256)
    outputs = batches | ScoreBatches(handler, DecisionEncoder(blueprint, key), policy)
    outputs.scored   # lists of ScoredDecision: decision_id, score, decision, propensity, ...
    outputs.failed   # DeadLetter: reason, source, step, detail, decision_id, payload

Every step after the read handles a whole batch as ONE element: the encoding, one RunInference
call (``BatchAsOneElement``), and the policy step; their batches are ``RowBatch``es, whose coder
keeps Beam's size sampling cheap. Formatting for a sink is its own step
(``transforms.score_output.WriteScores``).
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from loopline.policy import Policy, TopKPolicy
from transforms.batch_coder import RowBatch
from transforms.encoding import FAILED, DecisionEncoder, EncodeDecisions
from transforms.model_handler import METRICS_NAMESPACE, BatchAsOneElement, SavedModelHandler
from transforms.policy_step import ApplyPolicy, group_rows, key_by_group, utc_now
from transforms.scoring_failures import inference_failures


class ScoringOutputs(NamedTuple):
    scored: beam.PCollection  # list[ScoredDecision], one list per batch (or top-k group)
    failed: beam.PCollection  # DeadLetter


class ScoreBatches(beam.PTransform):
    """Scores batches of keyed decisions and applies the decision policy.

    Input: lists of ``(decision_id, DecisionEvent | serialized tf.Example)``, e.g. from
    ``beam.BatchElements`` right after the read. Output: ``ScoringOutputs``; rows that cannot be
    encoded and the rows of a batch whose model call raises go to ``failed``, never crash the
    job. A top-k policy ranks within groups, so its rows are regrouped by the group feature
    after inference (a shuffle); every other policy decides batch by batch.

        outputs = batches | ScoreBatches(SavedModelHandler(model), encoder, policy)
    """

    def __init__(
        self,
        model_handler: SavedModelHandler,
        encoder: DecisionEncoder,
        policy: Policy,
        clock=utc_now,
    ):
        super().__init__()
        self._handler = BatchAsOneElement(KeyedModelHandler(model_handler))
        self._encoder = encoder
        self._policy = policy
        self._clock = clock

    def expand(self, batches: beam.PCollection) -> ScoringOutputs:
        encoded = batches | "EncodeDecisions" >> beam.ParDo(
            EncodeDecisions(self._encoder)
        ).with_output_types(RowBatch).with_outputs(FAILED, main="encoded")
        results, dead = (
            encoded.encoded
            | "RunInference"
            >> RunInference(
                self._handler, metrics_namespace=METRICS_NAMESPACE
            ).with_exception_handling()
        )
        results.element_type = RowBatch  # one list of results per batch (BatchAsOneElement)
        if isinstance(self._policy, TopKPolicy):
            results = (
                results
                | "KeyByGroup" >> beam.FlatMap(key_by_group, self._policy.group_feature)
                | "GroupForTopK" >> beam.GroupByKey()
                | "GroupRows" >> beam.Map(group_rows)
            )
        scored = results | "ApplyPolicy" >> beam.ParDo(
            ApplyPolicy(self._policy, self._clock)
        ).with_output_types(RowBatch)
        failed = (
            encoded[FAILED],
            dead.failed_inferences | "InferenceFailures" >> beam.FlatMap(inference_failures),
        ) | "AllFailures" >> beam.Flatten()
        return ScoringOutputs(scored, failed)


class ScoreDecisions(beam.PTransform):
    """``ScoreBatches`` for keyed decisions one by one: batched first with the handler's bounds.

    outputs = keyed | ScoreDecisions(SavedModelHandler(model, max_batch_size=64), enc, policy)
    """

    def __init__(
        self,
        model_handler: SavedModelHandler,
        encoder: DecisionEncoder,
        policy: Policy,
        clock=utc_now,
    ):
        super().__init__()
        self._batching = model_handler.batch_elements_kwargs()
        self._score = ScoreBatches(model_handler, encoder, policy, clock)

    def expand(self, keyed: beam.PCollection) -> ScoringOutputs:
        return keyed | "Batch" >> beam.BatchElements(**self._batching) | "Score" >> self._score
