"""Calling a pushed model: its serving signature on serialized examples, and the decision
client's features-to-score scorer.

TensorFlow (and the example encoding) is imported when a model is loaded, not when this module
is: a product service that imports ``loopline`` pays for TensorFlow only if it scores with it.

    scorer = SavedModelScorer("serving/notify", blueprint)     # the production alias
    score = scorer({"tenure_days": 120, ...})                  # float in [0, 1]
    scorer.model_id                                            # 'notify-1793534400'
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from loopline.blueprint import Blueprint
from loopline.registry import ModelNotFound, resolve_serving_model

if TYPE_CHECKING:
    import numpy as np

SIGNATURE = "serving_default"
SCORE_KEY = "score"
DEVICES = ("CPU", "GPU")

_LOADED: weakref.WeakSet = weakref.WeakSet()  # every LoadedModel of this process
_RELEASE_AT_EXIT = threading.Lock()
_release_registered = False


def release_loaded_models() -> None:
    """Drops the loaded models' TensorFlow objects, while TensorFlow is still whole.

    Registered to run at exit once a model is loaded: Beam's shared handle keeps the last model
    alive until the process ends, and left to interpreter shutdown TF's function finalizers run
    after module teardown and print a TypeError each ("Exception ignored in:
    AtomicFunction.__del__"). Also undoes a ``gc.freeze()`` so that the collection reaches them.
    """
    for model in list(_LOADED):
        model.release()
    gc.unfreeze()
    gc.collect()


def _track(model: LoadedModel) -> None:
    global _release_registered
    with _RELEASE_AT_EXIT:
        if not _release_registered:
            atexit.register(release_loaded_models)
            _release_registered = True
    _LOADED.add(model)


class LoadedModel:
    """A loaded SavedModel's serving signature, called on batches of serialized examples.

    Returns numpy so that it works the same behind Beam's cross-process model proxy.
    """

    def __init__(self, path: str, device: str = "CPU"):
        import tensorflow as tf

        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        gpus = tf.config.list_physical_devices("GPU")
        if device == "GPU" and not gpus:
            raise RuntimeError("--device GPU was asked for but TensorFlow sees no GPU here")
        self._tf = tf
        # TF places ops on the GPU when it sees one; only CPU-on-a-GPU-machine needs a scope.
        # (Entering tf.device on every call costs milliseconds, so it is skipped otherwise.)
        self._device = "/CPU:0" if device == "CPU" and gpus else None
        with self._scope():
            self._saved = tf.saved_model.load(path)
        try:
            self._serve = self._saved.signatures[SIGNATURE]
        except KeyError:
            raise ModelNotFound(f"{path} has no {SIGNATURE} signature") from None
        # One call on no rows builds what TF builds lazily on the first call, so that the first
        # batch is not slow. A model that refuses it fails on its real batches instead.
        with contextlib.suppress(Exception), self._scope():
            self._serve(examples=tf.constant([], dtype=tf.string))
        _track(self)

    def release(self) -> None:
        """Lets go of the SavedModel; the model cannot score afterwards."""
        self._serve = self._saved = None

    def _scope(self):
        return self._tf.device(self._device) if self._device else contextlib.nullcontext()

    def score(self, examples: Sequence[bytes]) -> np.ndarray:
        """Scores for serialized tf.Examples, one float32 per example."""
        with self._scope():
            outputs = self._serve(examples=self._tf.constant(examples, dtype=self._tf.string))
        if SCORE_KEY not in outputs:
            raise ValueError(f"the model returned {sorted(outputs)}, not {SCORE_KEY!r}")
        scores = outputs[SCORE_KEY].numpy().reshape(-1)
        if scores.shape[0] != len(examples):
            raise ValueError(
                f"the model returned {scores.shape[0]} scores for {len(examples)} examples"
            )
        return scores


class SavedModelScorer:
    """A pushed model as a plain callable, features dict -> score, for the decision client.

        scorer = SavedModelScorer("serving/notify", blueprint)     # the production alias
        client = DecisionClient(blueprint, sink, scorer)

    ``key`` is the pseudonymisation key (``loopline.examples.pii_key(blueprint)``). The
    scorer never freezes its host's heap (bulk scoring's handler does, in its own workers).
    """

    def __init__(
        self,
        model_dir: str,
        blueprint: Blueprint,
        key: bytes | None = None,
        version: str | None = None,
        device: str = "CPU",
    ):
        # The training encoding, so that the model sees what it was trained on.
        from loopline.examples import features_to_example

        self.serving_model = resolve_serving_model(model_dir, blueprint.name, version)
        self.model_id = self.serving_model.model_id
        self._encode = features_to_example
        self._blueprint = blueprint
        self._key = key
        self._model = LoadedModel(self.serving_model.path, device)

    def __call__(self, features: Mapping[str, Any]) -> float:
        return float(self.score_many([features])[0])

    def score_many(self, features: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Scores for many feature dicts in one model call."""
        examples = [
            self._encode(f, self._blueprint, self._key).SerializeToString() for f in features
        ]
        return self._model.score(examples)
