"""Scoring decisions with the pushed model: a RunInference ModelHandler and the scoring transform.

The pushed model (DESIGN.md, "Model serving contract") is a TF SavedModel whose
``serving_default(examples: tf.string[None]) -> {"score": float32[None]}`` takes serialized raw
``tf.Example``s. Decisions are encoded with ``transforms.examples.features_to_example`` (a whole
batch at once with ``features_to_examples``, which parses to the same examples), the encoding the
join writes for training, so training and serving see the same features.

    handler = decision_model_handler(serving_model, blueprint, key, min_batch_size=256)
    outputs = keyed_decisions | ScoreDecisions(handler, policy)
    outputs.scored   # ScoredDecision: decision_id, score, decision, propensity, model_id, ...
    outputs.failed   # ScoringFailure: reason, step, detail, decision_id, payload

Per-element work is kept to two fused steps around RunInference: the handler encodes each batch
inside ``run_inference`` (no per-element preprocessing step), and one DoFn applies the policy and,
with ``json_rows=True``, formats the output line (and the logged decision event) in place.
``ScoreBatches`` does the same for input already cut into batches (bulk scoring batches right
after the read): each batch crosses RunInference and the policy step as ONE element.

One model is loaded per worker process and shared by its threads (Beam's shared handle);
``large_model`` or ``model_copies`` load it in a separate process shared by all SDK processes
of a worker (``model_copies`` fixes how many copies, e.g. one per GPU).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

from loopline.blueprint import Blueprint
from loopline.events import DecisionEvent
from loopline.policy import Choice, Policy, TopKPolicy
from transforms.examples import features_to_example, features_to_examples

SIGNATURE = "serving_default"
SCORE_KEY = "score"
METRICS_NAMESPACE = "loopline.inference"
DEVICES = ("CPU", "GPU")

# Dead-letter reasons of the scoring steps (parse refusals keep loopline.events' reasons).
ENCODE_FAILED = "encode_failed"
INFERENCE_FAILED = "inference_failed"
ENCODE_STEP = "EncodeDecision"

# ScoreDecisions' output tags.
SCORED = "scored"
FAILED = "failed"
LOGGED = "logged"

# The C string encoder json.dumps itself uses (ensure_ascii=True).
_json_str = json.encoder.encode_basestring_ascii

_VERSION = re.compile(r"^\d+$")


class ModelNotFound(ValueError):
    """No usable pushed model where one was expected, in one sentence."""


@dataclass(frozen=True)
class ServingModel:
    """One pushed model version: where it is and the ``model_id`` its outputs carry."""

    path: str
    version: str
    model_id: str
    record: Mapping[str, Any]


def resolve_serving_model(
    model_dir: str, blueprint_name: str | None, version: str | None = None
) -> ServingModel:
    """The named (or else the latest) version under a serving dir, or a version dir itself.

    The latest version is the largest integer directory name. The model record next to it
    (``<version>.record.json``), when present, must name the same blueprint. Without a
    ``blueprint_name`` the check is skipped and ``model_id`` uses the record's blueprint name.

        >>> resolve_serving_model("serving/notify", "notify").model_id
        'notify-1793534400'
    """
    root = Path(model_dir)
    if (root / "saved_model.pb").exists() and version in (None, root.name):
        path = root
    else:
        if not root.is_dir():
            raise ModelNotFound(f"model dir {model_dir} does not exist")
        versions = sorted(
            (p for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)),
            key=lambda p: int(p.name),
        )
        if version is not None:
            versions = [p for p in versions if p.name == str(version)]
            if not versions:
                raise ModelNotFound(f"model dir {model_dir} has no version {version}")
        if not versions:
            raise ModelNotFound(f"model dir {model_dir} holds no pushed version (integer dirs)")
        path = versions[-1]
    if not (path / "saved_model.pb").exists():
        raise ModelNotFound(f"{path} is not a SavedModel (no saved_model.pb)")
    record = _read_record(path)
    recorded = (record.get("blueprint") or {}).get("name")
    if recorded and blueprint_name and recorded != blueprint_name:
        raise ModelNotFound(
            f"model {path} was trained for blueprint {recorded!r}, not {blueprint_name!r}"
        )
    name = blueprint_name or recorded or "model"
    return ServingModel(str(path), path.name, f"{name}-{path.name}", record)


def _read_record(path: Path) -> dict:
    record_path = path.parent / f"{path.name}.record.json"
    try:
        return json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


_FROZEN = threading.Lock()
_frozen = False
_LOADED: weakref.WeakSet = weakref.WeakSet()  # every LoadedModel of this process


@atexit.register
def _release_loaded_models() -> None:
    """Drops the loaded models' TensorFlow objects at exit, while TensorFlow is still whole.

    Beam's shared handle keeps the last model alive until the process ends; left to interpreter
    shutdown, TF's function finalizers run after module teardown and print a TypeError each
    ("Exception ignored in: AtomicFunction.__del__"). Harmless, but noise after every job.
    """
    for model in list(_LOADED):
        model.release()
    gc.unfreeze()
    gc.collect()


def _freeze_long_lived_objects() -> None:
    """Once per process, after the first model a scoring handler loads: collect, then
    ``gc.freeze()`` what is left.

    The libraries (TensorFlow, Beam) and the model are several hundred thousand objects that live
    as long as the worker, and every full garbage collection walks them all: at 200,000 rows
    that was 1.2 s of a 9 s plain loop and 2.4 s of the pipeline. Frozen, they are skipped. The
    price: reference cycles among objects alive at that moment are never reclaimed, which is why
    garbage is collected first, why this runs once, and why only ``SavedModelHandler.load_model``
    (a scoring worker) does it, not ``LoadedModel`` itself (the decision client's host process
    may not want its heap frozen).
    """
    global _frozen
    with _FROZEN:
        if _frozen:
            return
        gc.collect()
        gc.freeze()
        _frozen = True


class LoadedModel:
    """A loaded SavedModel's serving signature, called on batches of serialized examples.

    Returns numpy so that it works the same behind Beam's cross-process model proxy.
    """

    def __init__(self, path: str, device: str = "CPU"):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "GPU" and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("--device GPU was asked for but TensorFlow sees no GPU here")
        # TF places ops on the GPU when it sees one; only CPU-on-a-GPU-machine needs a scope.
        # (Entering tf.device on every call costs milliseconds, so it is skipped otherwise.)
        gpus = tf.config.list_physical_devices("GPU")
        self._device = "/CPU:0" if device == "CPU" and gpus else None
        with self._scope():
            self._saved = tf.saved_model.load(path)
        try:
            self._serve = self._saved.signatures[SIGNATURE]
        except KeyError:
            raise ModelNotFound(f"{path} has no {SIGNATURE} signature") from None
        # One call on no rows builds what TF builds lazily on the first call, so that the first
        # batch is not slow and what it builds is frozen below. A model that refuses it fails
        # on its real batches instead, as dead letters.
        with contextlib.suppress(Exception), self._scope():
            self._serve(examples=tf.constant([], dtype=tf.string))
        _LOADED.add(self)

    def release(self) -> None:
        """Lets go of the SavedModel; the model cannot score afterwards."""
        self._serve = self._saved = None

    def _scope(self):
        return tf.device(self._device) if self._device else contextlib.nullcontext()

    def score(self, examples: Sequence[bytes]) -> np.ndarray:
        """Scores for serialized tf.Examples, one float32 per example."""
        with self._scope():
            outputs = self._serve(examples=tf.constant(examples, dtype=tf.string))
        if SCORE_KEY not in outputs:
            raise ValueError(f"the model returned {sorted(outputs)}, not {SCORE_KEY!r}")
        scores = outputs[SCORE_KEY].numpy().reshape(-1)
        if scores.shape[0] != len(examples):
            raise ValueError(
                f"the model returned {scores.shape[0]} scores for {len(examples)} examples"
            )
        return scores


class EncodeFailure(NamedTuple):
    """The "inference" of a row the handler could not encode: it is not scored and leaves on the
    dead-letter output with this detail (the rest of its batch is scored as usual)."""

    detail: str


class DecisionEncoder:
    """Turns decisions into the model's input: serialized ``features_to_example``s.

    Serialized examples (TFRecord input, already encoded by the join) pass through unchanged.
    ``encode_batch`` encodes a batch column by column (``features_to_examples``) and falls back
    to one row at a time only for a batch holding a row it cannot take, so that only the bad
    rows fail, each with its reason.

        >>> DecisionEncoder(blueprint, key)(event)[:2]
        b'\\n\\x94'
        >>> DecisionEncoder(blueprint, key).encode_batch([event, b"...", "junk"])
        [b'\\n\\x94...', b'...', EncodeFailure(detail="AttributeError: ...")]
    """

    def __init__(self, blueprint: Blueprint, key: bytes | None):
        self._blueprint = blueprint
        self._key = key

    def __call__(self, value: DecisionEvent | bytes) -> bytes:
        if isinstance(value, bytes):
            return value
        return features_to_example(value.features, self._blueprint, self._key).SerializeToString()

    def encode_batch(self, values: Sequence[Any]) -> list[bytes | EncodeFailure]:
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
                encoded[i] = _encode_one(self, values[i])
        return encoded


def _encode_one(encode, value: Any) -> bytes | EncodeFailure:
    try:
        return encode(value)
    except Exception as e:  # noqa: BLE001 - one bad row must not fail its batch
        return EncodeFailure(f"{type(e).__name__}: {e}")


class SavedModelHandler(ModelHandler[DecisionEvent | bytes, PredictionResult, LoadedModel]):
    """RunInference handler for the pushed SavedModel; elements are decision events or
    serialized tf.Examples.

    Each batch is encoded in one pass (``DecisionEncoder``, inside ``run_inference``: no
    per-element preprocessing step) and scored with one call of the serving signature.
    ``inference`` of every PredictionResult is the score (a float), or an ``EncodeFailure`` for
    a row that could not be encoded; ``model_id`` is the serving model's id. Without an
    ``encoder`` the elements must already be serialized examples.
    """

    def __init__(
        self,
        serving_model: ServingModel,
        *,
        encoder: DecisionEncoder | None = None,
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
        self._encoder = encoder
        batching = {
            "min_batch_size": min_batch_size,
            "max_batch_size": max_batch_size,
            "target_batch_duration_secs": target_batch_duration_secs,
            "max_batch_duration_secs": max_batch_duration_secs,
        }
        self._batching = {k: v for k, v in batching.items() if v is not None}
        self._model_copies = model_copies
        self._large_model = large_model
        self._sizes = threading.local()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_sizes"]  # thread-local, rebuilt where the handler lands
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sizes = threading.local()

    def load_model(self) -> LoadedModel:
        model = LoadedModel(self.serving_model.path, self.device)
        _freeze_long_lived_objects()  # a scoring worker from here on; see the function
        return model

    def run_inference(
        self,
        batch: Sequence[DecisionEvent | bytes],
        model: LoadedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        model_id = self.serving_model.model_id
        if self._encoder is not None:
            encoded = self._encoder.encode_batch(batch)
        else:
            encoded = [_encode_one(_as_bytes, value) for value in batch]
        examples: list[bytes] = []
        encoded_at: list[int] = []
        results: list[PredictionResult | None] = [None] * len(batch)
        for i, example in enumerate(encoded):
            if isinstance(example, EncodeFailure):
                results[i] = PredictionResult(batch[i], example)
            else:
                examples.append(example)
                encoded_at.append(i)
        self._sizes.last = sum(map(len, examples))
        if examples:
            # tolist(): Python floats in one call instead of a numpy scalar per row.
            for i, score in zip(encoded_at, model.score(examples).tolist(), strict=True):
                results[i] = PredictionResult(batch[i], score, model_id)
        return results

    def get_num_bytes(self, batch: Sequence[DecisionEvent | bytes]) -> int:
        # RunInference asks right after run_inference on the same thread: the encoded size of
        # that batch (the default would pickle the whole batch again).
        return getattr(self._sizes, "last", 0)

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


def _as_bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected a serialized tf.Example, got {type(value).__name__}")
    return value


def decision_model_handler(
    serving_model: ServingModel, blueprint: Blueprint, key: bytes | None, **options: Any
) -> ModelHandler:
    """The keyed handler bulk scoring uses: ``(decision_id, DecisionEvent | bytes)`` in,
    ``(decision_id, PredictionResult)`` out, encoding each batch inside ``run_inference``.

    ``options`` are SavedModelHandler's (device, batch sizes, model_copies, large_model).
    """
    encoder = DecisionEncoder(blueprint, key)
    return KeyedModelHandler(SavedModelHandler(serving_model, encoder=encoder, **options))


@dataclass(frozen=True)
class ScoredDecision:
    """One scored decision and the policy's choice for it."""

    decision_id: str
    score: float
    decision: int
    propensity: float
    explored: bool
    model_id: str
    scored_at: str
    event: DecisionEvent | None = None

    def to_row(self) -> dict:
        """The output row (JSON lines and BigQuery)."""
        return {
            "decision_id": self.decision_id,
            "score": self.score,
            "decision": self.decision,
            "propensity": self.propensity,
            "explored": self.explored,
            "model_id": self.model_id,
            "scored_at": self.scored_at,
        }

    def to_decision_event(self) -> DecisionEvent | None:
        """The scored decision as a DecisionEvent (None without a source event)."""
        if self.event is None:
            return None
        return replace(
            self.event, decision=self.decision, model_id=self.model_id, propensity=self.propensity
        )


@dataclass(frozen=True)
class ScoringFailure:
    """A decision that could not be scored: the dead-letter record."""

    reason: str
    step: str
    detail: str
    decision_id: str | None
    payload: str

    def to_dict(self) -> dict:
        return {
            "reason": self.reason,
            "step": self.step,
            "detail": self.detail,
            "decision_id": self.decision_id,
            "payload": self.payload,
        }


class ScoringOutputs(NamedTuple):
    scored: beam.PCollection  # ScoredDecision, or JSON lines with json_rows=True
    failed: beam.PCollection  # ScoringFailure
    logged: beam.PCollection | None = None  # decision-event JSON lines with log_decisions=True


def _payload(value: Any) -> str:
    if isinstance(value, DecisionEvent):
        return value.to_json()
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def _exception_detail(error: Any) -> str:
    # Beam's dead letters carry (exception type, repr, formatted traceback); the traceback's
    # last line has the message (TF errors' repr is only their class name).
    if isinstance(error, tuple) and len(error) >= 3 and error[2]:
        return str(error[2][-1]).strip()[:2000]
    if isinstance(error, tuple) and len(error) >= 2:
        return f"{getattr(error[0], '__name__', error[0])}: {str(error[1])[:2000]}"
    return str(error)[:2000]


def _inference_failures(failed: tuple) -> Iterable[ScoringFailure]:
    batch, error = failed
    detail = _exception_detail(error)
    counter = beam.metrics.Metrics.counter("loopline.score", "inference_failed")
    for decision_id, value in batch:
        counter.inc()
        yield ScoringFailure(INFERENCE_FAILED, "RunInference", detail, decision_id, _payload(value))


_last_now: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """Now as RFC 3339 UTC with milliseconds (formatted at most once per millisecond)."""
    global _last_now
    now_ms = time.time_ns() // 1_000_000
    if now_ms != _last_now[0]:
        moment = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
        _last_now = (now_ms, moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now_ms % 1000:03d}Z")
    return _last_now[1]


def _json_float(value: float) -> str:
    # json.dumps' own float spelling: repr, with NaN/Infinity for non-finite values.
    if value != value:
        return "NaN"
    if value in (_INF, -_INF):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


_INF = float("inf")


def row_json(
    decision_id: str,
    score: float,
    choice: Choice,
    model_id: str,
    scored_at: str,
) -> str:
    """One output row as the JSON line bulk scoring writes, without building a dict.

    Equal to ``json.dumps(ScoredDecision(...).to_row(), sort_keys=True, separators=(",", ":"))``
    (tests check it), at a fraction of the cost.

        >>> row_json("d-1", 0.75, Choice(1, 0.975, False), "notify-1", "2026-11-01T12:00:00.000Z")
        '{"decision":1,"decision_id":"d-1","explored":false,"model_id":"notify-1",...}'
    """
    return (
        f'{{"decision":{int(choice.decision)},"decision_id":{_json_str(decision_id)},'
        f'"explored":{"true" if choice.explored else "false"},"model_id":{_json_str(model_id)},'
        f'"propensity":{_json_float(float(choice.propensity))},"score":{_json_float(score)},'
        f'"scored_at":{_json_str(scored_at)}}}'
    )


class _Emit:
    """What the policy step emits for one scored decision: a ScoredDecision, or (``json_rows``)
    its output JSON line; with ``log_decisions`` also the decision event JSON, tagged
    ``decisions``."""

    def __init__(self, json_rows: bool, log_decisions: bool):
        self._json_rows = json_rows
        self._log_decisions = log_decisions

    def __call__(self, decision_id: str, result: PredictionResult, choice: Choice, scored_at: str):
        event = result.example if isinstance(result.example, DecisionEvent) else None
        if self._json_rows:
            yield row_json(decision_id, result.inference, choice, result.model_id, scored_at)
        else:
            yield ScoredDecision(
                decision_id,
                result.inference,
                choice.decision,
                choice.propensity,
                choice.explored,
                result.model_id,
                scored_at,
                event,
            )
        if self._log_decisions and event is not None:
            logged = replace(
                event,
                decision=choice.decision,
                model_id=result.model_id,
                propensity=choice.propensity,
            )
            yield beam.pvalue.TaggedOutput(LOGGED, logged.to_json())


def _encode_failure(decision_id: str, result: PredictionResult) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(
        FAILED,
        ScoringFailure(
            ENCODE_FAILED,
            ENCODE_STEP,
            result.inference.detail,
            decision_id,
            _payload(result.example),
        ),
    )


class _ApplyPolicy(beam.DoFn):
    """``(decision_id, PredictionResult)`` to the policy's choice, formatted for output in the
    same step (see ``_Emit``); rows that could not be encoded leave tagged ``failed``."""

    def __init__(self, policy: Policy, emit: _Emit, clock=utc_now):
        self._policy = policy
        self._emit = emit
        self._clock = clock

    def setup(self):
        self._decisions = beam.metrics.Metrics.counter("loopline.score", "decisions")
        self._explored = beam.metrics.Metrics.counter("loopline.score", "explored")
        self._encode_failed = beam.metrics.Metrics.counter("loopline.score", "encode_failed")

    def start_bundle(self):
        self._counts = [0, 0]

    def process(self, element: tuple[str, PredictionResult]):
        decision_id, result = element
        if isinstance(result.inference, EncodeFailure):
            self._encode_failed.inc()
            yield _encode_failure(decision_id, result)
            return
        choice = self._policy.choose(result.inference, decision_id)
        self._counts[0] += 1
        self._counts[1] += choice.explored
        yield from self._emit(decision_id, result, choice, self._clock())

    def finish_bundle(self):
        self._decisions.inc(self._counts[0])
        self._explored.inc(self._counts[1])
        self._counts = [0, 0]


class _KeyByGroup(beam.DoFn):
    """Keys scored rows by their top-k group (the JSON of the group feature's value); rows that
    could not be encoded leave tagged ``failed``."""

    def __init__(self, group_feature: str | None):
        self._group_feature = group_feature

    def process(self, element: tuple[str, PredictionResult]):
        decision_id, result = element
        if isinstance(result.inference, EncodeFailure):
            beam.metrics.Metrics.counter("loopline.score", "encode_failed").inc()
            yield _encode_failure(decision_id, result)
            return
        event = result.example if isinstance(result.example, DecisionEvent) else None
        value = (
            ""
            if self._group_feature is None or event is None
            else event.features.get(self._group_feature)
        )
        yield json.dumps(value, sort_keys=True), element


class _ChooseTopK(beam.DoFn):
    """One group of ``(decision_id, PredictionResult)`` to its outputs by exact top-k."""

    def __init__(self, policy: TopKPolicy, emit: _Emit, clock=utc_now):
        self._policy = policy
        self._emit = emit
        self._clock = clock

    def process(self, group: tuple[str, Iterable[tuple[str, PredictionResult]]]):
        members = sorted(group[1], key=lambda m: m[0])
        choices = self._policy.choose_group([(d, r.inference) for d, r in members])
        scored_at = self._clock()
        decisions = beam.metrics.Metrics.counter("loopline.score", "decisions")
        for (decision_id, result), choice in zip(members, choices, strict=True):
            decisions.inc()
            yield from self._emit(decision_id, result, choice, scored_at)


class ScoreDecisions(beam.PTransform):
    """Scores keyed decisions with RunInference and applies the decision policy.

    Input: ``(decision_id, DecisionEvent)`` or ``(decision_id, serialized tf.Example)``.
    Output: ``ScoringOutputs(scored, failed, logged)``; encoding and inference failures (a whole
    batch when the model throws) go to ``failed`` with the exception, never crash the job.
    ``scored`` holds ScoredDecisions, or with ``json_rows=True`` their output JSON lines
    (``row_json``) formatted in the policy step itself; with ``log_decisions=True``, ``logged``
    holds the scored decisions as decision-event JSON lines (else it is None).

        outputs = keyed | ScoreDecisions(decision_model_handler(model, bp, key), policy)
    """

    def __init__(
        self,
        model_handler: ModelHandler,
        policy: Policy,
        clock=utc_now,
        *,
        json_rows: bool = False,
        log_decisions: bool = False,
    ):
        super().__init__()
        self._handler = model_handler
        self._policy = policy
        self._clock = clock
        self._emit = _Emit(json_rows, log_decisions)
        self._log_decisions = log_decisions

    def expand(self, keyed: beam.PCollection) -> ScoringOutputs:
        results, dead = (
            keyed
            | "RunInference"
            >> RunInference(
                self._handler, metrics_namespace=METRICS_NAMESPACE
            ).with_exception_handling()
        )
        if isinstance(self._policy, TopKPolicy):
            grouped = results | "KeyByGroup" >> beam.ParDo(
                _KeyByGroup(self._policy.group_feature)
            ).with_outputs(FAILED, main="keyed")
            chosen = (
                grouped.keyed
                | "GroupForTopK" >> beam.GroupByKey()
                | "ChooseTopK"
                >> beam.ParDo(_ChooseTopK(self._policy, self._emit, self._clock)).with_outputs(
                    LOGGED, main=SCORED
                )
            )
            encode_failed = grouped[FAILED]
        else:
            chosen = results | "ApplyPolicy" >> beam.ParDo(
                _ApplyPolicy(self._policy, self._emit, self._clock)
            ).with_outputs(FAILED, LOGGED, main=SCORED)
            encode_failed = chosen[FAILED]
        failures = [
            encode_failed,
            dead.failed_inferences | "InferenceFailures" >> beam.FlatMap(_inference_failures),
        ]
        failed = failures | "AllFailures" >> beam.Flatten()
        logged = chosen[LOGGED] if self._log_decisions else None
        return ScoringOutputs(chosen[SCORED], failed, logged)


class BatchAsOneElement(ModelHandler):
    """Wraps a (keyed) handler for input that is already batched: each element is one batch
    (a list of ``(decision_id, value)``), RunInference skips its own BatchElements, and the
    batch's results leave as ONE element, the list of ``(decision_id, PredictionResult)``.

    RunInference's metrics still count rows (``len`` of the batch), so
    ``inference_request_batch_size`` is the real model batch size.

        handler = BatchAsOneElement(decision_model_handler(model, blueprint, key))
    """

    def __init__(self, base: ModelHandler):
        super().__init__()
        self._base = base

    def load_model(self):
        return self._base.load_model()

    def run_inference(self, batch, model, inference_args=None):
        return [list(self._base.run_inference(batch, model, inference_args))]

    def get_num_bytes(self, batch) -> int:
        # A keyed batch: the keys' UTF-8 size plus the handler's own count (SavedModelHandler:
        # the encoded examples), instead of KeyedModelHandler's pickling of all the keys.
        unkeyed = getattr(self._base, "_unkeyed", None)
        if isinstance(self._base, KeyedModelHandler) and isinstance(unkeyed, SavedModelHandler):
            return sum(len(key.encode()) for key, _ in batch) + unkeyed.get_num_bytes(())
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

    def __repr__(self) -> str:
        return f"BatchAsOneElement({self._base!r})"


class _ApplyPolicyToBatch(_ApplyPolicy):
    """A batch of ``(decision_id, PredictionResult)`` to ONE element of newline-joined output
    JSON lines (``row_json``) and, with ``log_decisions``, one of decision-event lines tagged
    ``logged``; per-row encode failures leave tagged ``failed`` as in ``_ApplyPolicy``."""

    def __init__(self, policy: Policy, log_decisions: bool, clock=utc_now):
        super().__init__(policy, _Emit(True, log_decisions), clock)
        self._log_decisions = log_decisions

    def process(self, batch: list[tuple[str, PredictionResult]]):
        choose = self._policy.choose
        scored_at = self._clock()
        rows: list[str] = []
        logged: list[str] = []
        explored = 0
        for decision_id, result in batch:
            if isinstance(result.inference, EncodeFailure):
                self._encode_failed.inc()
                yield _encode_failure(decision_id, result)
                continue
            choice = choose(result.inference, decision_id)
            explored += choice.explored
            rows.append(row_json(decision_id, result.inference, choice, result.model_id, scored_at))
            if self._log_decisions and isinstance(result.example, DecisionEvent):
                event = replace(
                    result.example,
                    decision=choice.decision,
                    model_id=result.model_id,
                    propensity=choice.propensity,
                )
                logged.append(event.to_json())
        self._counts[0] += len(rows)
        self._counts[1] += explored
        if rows:
            yield "\n".join(rows)
        if logged:
            yield beam.pvalue.TaggedOutput(LOGGED, "\n".join(logged))


class ScoreBatches(beam.PTransform):
    """``ScoreDecisions`` for input already cut into batches (lists of ``(decision_id,
    DecisionEvent | bytes)``, e.g. from ``beam.BatchElements`` right after the read): one
    RunInference call per batch and one policy step per batch, so rows cross no Beam step one by
    one. Outputs as ``ScoreDecisions(json_rows=True)``, except that each ``scored`` (and
    ``logged``) element is a whole batch's JSON lines joined by newlines (``WriteToText`` writes
    them as lines). Top-k policies group rows, so their batches are split back into rows.

        outputs = batches | ScoreBatches(decision_model_handler(model, bp, key), policy)
    """

    def __init__(
        self, model_handler: ModelHandler, policy: Policy, clock=utc_now, *, log_decisions=False
    ):
        super().__init__()
        self._handler = model_handler
        self._policy = policy
        self._clock = clock
        self._log_decisions = log_decisions

    def expand(self, batches: beam.PCollection) -> ScoringOutputs:
        if isinstance(self._policy, TopKPolicy):
            return (
                batches
                | "Unbatch" >> beam.FlatMap(lambda batch: batch)
                | "ScoreDecisions"
                >> ScoreDecisions(
                    self._handler,
                    self._policy,
                    self._clock,
                    json_rows=True,
                    log_decisions=self._log_decisions,
                )
            )
        results, dead = (
            batches
            | "RunInference"
            >> RunInference(
                BatchAsOneElement(self._handler), metrics_namespace=METRICS_NAMESPACE
            ).with_exception_handling()
        )
        chosen = results | "ApplyPolicy" >> beam.ParDo(
            _ApplyPolicyToBatch(self._policy, self._log_decisions, self._clock)
        ).with_outputs(FAILED, LOGGED, main=SCORED)
        failures = [
            chosen[FAILED],
            dead.failed_inferences | "InferenceFailures" >> beam.FlatMap(_inference_failures),
        ]
        failed = failures | "AllFailures" >> beam.Flatten()
        logged = chosen[LOGGED] if self._log_decisions else None
        return ScoringOutputs(chosen[SCORED], failed, logged)


class SavedModelScorer:
    """A pushed model as a plain callable, features dict -> score, for the decision client.

        scorer = SavedModelScorer("serving/notify", blueprint)     # latest version
        score = scorer({"tenure_days": 120, ...})                  # float in [0, 1]
        scorer.model_id                                            # 'notify-1793534400'

    ``key`` is the pseudonymisation key (``transforms.examples.pii_key(blueprint)``).
    """

    def __init__(
        self,
        model_dir: str,
        blueprint: Blueprint,
        key: bytes | None = None,
        version: str | None = None,
        device: str = "CPU",
    ):
        self.serving_model = resolve_serving_model(model_dir, blueprint.name, version)
        self.model_id = self.serving_model.model_id
        self._blueprint = blueprint
        self._key = key
        self._model = LoadedModel(self.serving_model.path, device)

    def __call__(self, features: Mapping[str, Any]) -> float:
        return float(self.score_many([features])[0])

    def score_many(self, features: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Scores for many feature dicts in one model call."""
        examples = [
            features_to_example(f, self._blueprint, self._key).SerializeToString() for f in features
        ]
        return self._model.score(examples)
