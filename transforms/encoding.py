"""Decisions to the model's input, a batch at a time: serialized ``features_to_example``s, the
encoding the join writes for training, so that training and serving see the same features.

    encoder = DecisionEncoder(blueprint, key)
    encoder.encode_batch([event, b"<serialized example>", "junk"])
    # [b'\\n\\x94...', b'<serialized example>', EncodeFailure(detail="AttributeError: ...")]
    batches | beam.ParDo(EncodeDecisions(encoder)).with_outputs(FAILED, main="encoded")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import apache_beam as beam

from loopline.blueprint import Blueprint
from loopline.events import DecisionEvent
from loopline.examples import features_to_example, features_to_examples
from transforms.scoring_failures import (
    COUNTER_NAMESPACE,
    ENCODE_FAILED,
    ENCODE_STEP,
    payload,
    scoring_failure,
)

FAILED = "failed"


class EncodeFailure(NamedTuple):
    """Why one row could not be encoded (the rest of its batch is encoded as usual)."""

    detail: str


class EncodedDecision(NamedTuple):
    """A decision ready for the model: its serialized example, and the decision event it came
    from (None for input that was already a serialized example)."""

    example: bytes
    event: DecisionEvent | None

    @property
    def source(self) -> DecisionEvent | bytes:
        """What the row was before encoding, for its dead letter."""
        return self.event if self.event is not None else self.example


class DecisionEncoder:
    """Turns decisions into serialized ``features_to_example``s.

    Serialized examples (TFRecord input, already encoded by the join) pass through unchanged.
    ``encode_batch`` encodes a batch column by column (``features_to_examples``) and falls back
    to one row at a time only for a batch holding a row it cannot take, so that only the bad
    rows fail, each with its reason.
    """

    def __init__(self, blueprint: Blueprint, key: bytes | None):
        self._blueprint = blueprint
        self._key = key

    def __call__(self, value: DecisionEvent | bytes) -> bytes:
        if isinstance(value, bytes):
            return value
        return features_to_example(value.features, self._blueprint, self._key).SerializeToString()

    def encode_batch(self, values: Sequence[Any]) -> list[bytes | EncodeFailure]:
        """One serialized example (or EncodeFailure) per value, in order."""
        events = [i for i, value in enumerate(values) if not isinstance(value, bytes)]
        encoded: list[bytes | EncodeFailure] = list(values)
        if not events:
            return encoded
        try:
            rows = [values[i].features for i in events]
            for i, example in zip(
                events, features_to_examples(rows, self._blueprint, self._key), strict=True
            ):
                encoded[i] = example
        except Exception:  # noqa: BLE001 - some row is bad: find it (and why) one by one
            for i in events:
                encoded[i] = self._encode_one(values[i])
        return encoded

    def _encode_one(self, value: Any) -> bytes | EncodeFailure:
        try:
            return self(value)
        except Exception as e:  # noqa: BLE001 - one bad row must not fail its batch
            return EncodeFailure(f"{type(e).__name__}: {e}")


class EncodeDecisions(beam.DoFn):
    """A batch of ``(decision_id, DecisionEvent | bytes)`` to ONE batch of ``(decision_id,
    EncodedDecision)`` (none for a batch with no encodable row); each row that cannot be encoded
    leaves alone, tagged ``failed``, as a dead letter (``encode_failed``)."""

    def __init__(self, encoder: DecisionEncoder):
        self._encoder = encoder

    def setup(self) -> None:
        self._encode_failed = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, ENCODE_FAILED)

    def process(self, batch: Sequence[tuple[str, DecisionEvent | bytes]]):
        examples = self._encoder.encode_batch([value for _, value in batch])
        encoded = []
        for (decision_id, value), example in zip(batch, examples, strict=True):
            if isinstance(example, EncodeFailure):
                self._encode_failed.inc()
                failure = scoring_failure(
                    ENCODE_FAILED, ENCODE_STEP, example.detail, decision_id, payload(value)
                )
                yield beam.pvalue.TaggedOutput(FAILED, failure)
            else:
                event = value if isinstance(value, DecisionEvent) else None
                encoded.append((decision_id, EncodedDecision(example, event)))
        if encoded:
            yield encoded
