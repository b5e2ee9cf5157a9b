"""The RunInference model handler for the pushed SavedModel, and the wrapper that lets a whole
pre-formed batch cross RunInference as one element.

    handler = SavedModelHandler(serving_model, min_batch_size=256, max_batch_size=2048)
    batches | RunInference(BatchAsOneElement(KeyedModelHandler(handler)))

    # A rollout's two models in one RunInference, rows keyed by arm:
    arms = models_by_arm({"production": SavedModelHandler(a), "challenger": SavedModelHandler(b)})
    arm_batches | RunInference(BatchAsOneElement(arms))

One model is loaded per worker process and shared by its threads (Beam's shared handle);
``large_model`` or ``model_copies`` load it in a separate process shared by all SDK processes
of a worker (``model_copies`` fixes how many copies, e.g. one per GPU).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    KeyModelMapping,
    ModelHandler,
    PredictionResult,
)

from loopline.registry import ServingModel
from loopline.scorer import DEVICES, LoadedModel
from transforms.encoding import EncodedDecision

METRICS_NAMESPACE = "loopline.inference"

_FREEZE = threading.Lock()
_frozen = False


def freeze_long_lived_objects() -> None:
    """Once per process: collect garbage, then ``gc.freeze()`` what is left.

    A scoring worker calls this right after loading its model (``SavedModelHandler.load_model``).
    The libraries (TensorFlow, Beam) and the model are several hundred thousand objects that live
    as long as the worker, and every full garbage collection walks them all: at 200,000 rows
    that was 1.2 s of a 9 s plain loop and 2.4 s of the pipeline. Frozen, they are skipped. The
    price: reference cycles among objects alive at that moment are never reclaimed, which is why
    garbage is collected first, why this runs once, and why the decision client's
    ``SavedModelScorer`` never does it (its host process may not want its heap frozen).
    """
    global _frozen
    with _FREEZE:
        if _frozen:
            return
        gc.collect()
        gc.freeze()
        _frozen = True


class SavedModelHandler(ModelHandler[EncodedDecision, PredictionResult, LoadedModel]):
    """RunInference handler for the pushed SavedModel; elements are ``EncodedDecision``s.

    Each batch is scored with one call of the serving signature; ``inference`` of every
    PredictionResult is the score (a float) and ``model_id`` the serving model's id.
    """

    def __init__(
        self,
        serving_model: ServingModel,
        *,
        device: str = "CPU",
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        target_batch_duration_secs: float | None = None,
        max_batch_duration_secs: float | None = None,
        model_copies: int | None = None,
        large_model: bool = False,
    ):
        super().__init__()
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if min_batch_size and max_batch_size and min_batch_size > max_batch_size:
            raise ValueError(
                f"min_batch_size {min_batch_size} is larger than max_batch_size {max_batch_size}"
            )
        if model_copies is not None and model_copies < 1:
            raise ValueError(f"model_copies must be at least 1, got {model_copies}")
        self.serving_model = serving_model
        self.device = device
        batching = {
            "min_batch_size": min_batch_size,
            "max_batch_size": max_batch_size,
            "target_batch_duration_secs": target_batch_duration_secs,
            "max_batch_duration_secs": max_batch_duration_secs,
        }
        self._batching = {k: v for k, v in batching.items() if v is not None}
        self._model_copies = model_copies
        self._large_model = large_model

    def load_model(self) -> LoadedModel:
        """Loads the model, then freezes the worker's long-lived objects (see
        ``freeze_long_lived_objects``): a process that loads this handler's model scores."""
        model = LoadedModel(self.serving_model.path, self.device)
        freeze_long_lived_objects()
        return model

    def run_inference(
        self,
        batch: Sequence[EncodedDecision],
        model: LoadedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        if not batch:
            return []
        model_id = self.serving_model.model_id
        # tolist(): Python floats in one call instead of a numpy scalar per row.
        scores = model.score([row.example for row in batch]).tolist()
        return [
            PredictionResult(row, score, model_id) for row, score in zip(batch, scores, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[EncodedDecision]) -> int:
        # The serialized examples the model reads (the default would pickle the whole batch).
        return sum(len(row.example) for row in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching)

    def share_model_across_processes(self) -> bool:
        return self._large_model or self._model_copies is not None

    def model_copies(self) -> int:
        return self._model_copies or 1

    def __repr__(self) -> str:
        return f"SavedModelHandler({self.serving_model.model_id}, device={self.device})"


def models_by_arm(handlers: Mapping[str, SavedModelHandler]) -> KeyedModelHandler:
    """Several models in ONE RunInference: Beam's ``KeyedModelHandler`` with a
    ``KeyModelMapping`` per arm. Elements are ``(arm, (decision_id, EncodedDecision))``; each
    arm's rows are scored by its own handler's model, and come out as ``(arm, (decision_id,
    PredictionResult))`` with that model's id.

    Beam loads each model once per worker, shared by its SDK processes, and holds at most
    ``max_models_per_worker_hint`` (here: all of them, two at most in a rollout) in memory.
    The handlers' own batching settings are not used: rows arrive batched (``BatchAsOneElement``).
    """
    if not handlers:
        raise ValueError("models_by_arm needs at least one arm with a model")
    return KeyedModelHandler(
        [KeyModelMapping([arm], KeyedModelHandler(handler)) for arm, handler in handlers.items()],
        max_models_per_worker_hint=len(handlers),
    )


class BatchAsOneElement(ModelHandler):
    """Wraps a (keyed) handler for input that is already batched: each element is one batch,
    RunInference skips its own BatchElements, and the batch's results leave as ONE element, the
    list of the wrapped handler's results.

    Beam's ``with_no_batching()`` also skips the batching but emits the results one by one;
    this keeps later steps on whole batches. RunInference's metrics still count rows (``len`` of
    the batch), so ``inference_request_batch_size`` is the real model batch size.

        handler = BatchAsOneElement(KeyedModelHandler(SavedModelHandler(serving_model)))
    """

    def __init__(self, base: ModelHandler):
        super().__init__()
        self._base = base

    def load_model(self):
        return self._base.load_model()

    def run_inference(self, batch, model, inference_args=None):
        return [list(self._base.run_inference(batch, model, inference_args))]

    def get_num_bytes(self, batch) -> int:
        return self._base.get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return self._base.get_metrics_namespace()

    def get_resource_hints(self):
        return self._base.get_resource_hints()

    def batch_elements_kwargs(self):
        return self._base.batch_elements_kwargs()

    def validate_inference_args(self, inference_args):
        return self._base.validate_inference_args(inference_args)

    def update_model_path(self, model_path=None):
        return self._base.update_model_path(model_path=model_path)

    def should_skip_batching(self) -> bool:
        return True

    def share_model_across_processes(self) -> bool:
        return self._base.share_model_across_processes()

    def model_copies(self) -> int:
        return self._base.model_copies()

    def override_metrics(self, metrics_namespace: str = "") -> bool:
        # A KeyedModelHandler of several models reports its own (per-arm) metrics.
        return self._base.override_metrics(metrics_namespace)

    def should_garbage_collect_on_timeout(self) -> bool:
        return self._base.should_garbage_collect_on_timeout()

    def __repr__(self) -> str:
        return f"BatchAsOneElement({self._base!r})"
