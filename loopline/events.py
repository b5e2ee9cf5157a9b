"""Decision and observation events, and their parsing (DESIGN.md, "Event contract").

Parsing never raises on bad input: every parser returns either an event or a ``DeadLetter``
that carries a reason code, a sentence saying what is wrong, and the raw payload, so a Beam DoFn
can route it to a dead-letter output. ``DeadLetter`` is the one shape of every dead-letter
output, the join's, scoring's and the monitor's alike.

What is accepted is what every later step can write without failing or losing precision:

* text: UTF-8 only (bytes that are not are refused, never parsed with replacement characters);
  one UTF-8 byte-order mark at the start of a line is skipped, since Windows tools write one at
  the start of a file and the event after it is fine. Strings holding a lone surrogate (a JSON
  ``"\\udcff"`` escape) cannot be written as UTF-8 and are refused like a wrong type.
* event time: ``2000-01-01T00:00:00Z`` <= t < ``2100-01-01T00:00:00Z`` (``MIN_EVENT_TIME_MS``,
  ``MAX_EVENT_TIME_MS``). Outside that range is almost always a unit mistake: epoch seconds
  (2026 in seconds is January 1970 in milliseconds) or microseconds; ``bad_time`` says which.
* numbers: an ``int`` feature fits int64; a ``float`` feature is finite and fits float32 (what
  a tf.Example's float_list holds); the label's observation value fits the label's column
  (int64 for an ``int`` label, float32 for a ``float`` one); a propensity is in [0, 1]. Python's
  JSON reader takes integers of any size and ``NaN`` / ``Infinity``: all of those are refused.
* nesting: a line whose JSON nests deeper than ``MAX_JSON_DEPTH`` (32) is ``bad_json``.

    >>> parse_decision_json('{"decision_id": "d1", "decision_type": "notify", '
    ...                     '"event_time": "2026-11-01T12:00:00Z", "features": {}}')
    DecisionEvent(decision_id='d1', ...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from loopline.blueprint import Blueprint
from loopline.vocabulary import PARSE_REASONS, Reason

DECISION = "decision"
OBSERVATION = "observation"

# Reason codes of a refusal (loopline.vocabulary.Reason); DESIGN.md's rejected/ output carries
# them as "reason".
BAD_JSON = Reason.BAD_JSON
NOT_AN_OBJECT = Reason.NOT_AN_OBJECT
MISSING_FIELD = Reason.MISSING_FIELD
WRONG_TYPE = Reason.WRONG_TYPE
BAD_TIME = Reason.BAD_TIME
UNKNOWN_FEATURE = Reason.UNKNOWN_FEATURE
MISSING_FEATURE = Reason.MISSING_FEATURE
FEATURE_TYPE = Reason.FEATURE_TYPE
WRONG_DECISION_TYPE = Reason.WRONG_DECISION_TYPE
LABEL_TYPE = Reason.LABEL_TYPE
BAD_AVRO = Reason.BAD_AVRO
REASONS = PARSE_REASONS

# The accepted event-time range (see the module docstring): [2000-01-01, 2100-01-01) UTC, in
# epoch milliseconds. Fixed rather than relative to now, so a rerun of old logs refuses exactly
# what the first run refused.
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_EVENT_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z, excluded
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
_BOM = "\ufeff"
# Deeper JSON than this is refused: an event is a flat object of flat values, and a deeper one
# could pass json.loads yet hit the recursion limit later, when a Beam coder pickles it or a
# writer dumps it, and fail the job there.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class DecisionEvent:
    """A logged decision: the exact features the product saw when it decided."""

    decision_id: str
    decision_type: str
    event_time_ms: int
    features: dict[str, Any]
    blueprint_version: str | None = None
    decision: Any = None
    model_id: str | None = None
    propensity: float | None = None
    score: float | None = None  # the model's output, when a model decided
    arm: str | None = None  # "production" or "challenger" while a challenger serves

    def to_dict(self) -> dict:
        """The event in its JSON form (event_time as RFC 3339), omitting absent optionals."""
        out = {
            "decision_id": self.decision_id,
            "decision_type": self.decision_type,
            "event_time": format_event_time(self.event_time_ms),
            "features": self.features,
        }
        for key in ("blueprint_version", "decision", "model_id", "propensity", "score", "arm"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def with_choice(
        self,
        decision: Any,
        propensity: float,
        model_id: str | None,
        score: float | None = None,
        arm: str | None = None,
    ) -> DecisionEvent:
        """This event as logged once a policy chose: the decision, its propensity, the model,
        the model's score and the rollout arm that served it (None: not a model's / no rollout).

        >>> event.with_choice(1, 0.975, "notify-1", score=0.31).propensity
        0.975
        """
        return replace(
            self,
            decision=decision,
            model_id=model_id,
            propensity=float(propensity),
            score=score,
            arm=arm,
        )


@dataclass(frozen=True)
class ObservationEvent:
    """Something that happened after a decision, reported by the product."""

    decision_id: str
    event_time_ms: int
    observations: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "decision_id": self.decision_id,
            "event_time": format_event_time(self.event_time_ms),
            "observations": self.observations,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class DeadLetter:
    """An input or row that could not go on, and why: the one record of every dead-letter
    output (the join's ``rejected/`` and ``late/``, scoring's ``failed/``, the monitor's refused
    score rows). ``payload`` is the raw text as read, or (once a step has applied the
    blueprint's privacy, see ``loopline.privacy.redact_payload``) its redacted form, a mapping.

        >>> DeadLetter(BAD_JSON, DECISION, "ParseDecisions", "not JSON", "{oops").to_dict()
        {'reason': 'bad_json', 'source': 'decision', 'step': 'ParseDecisions', ...}
    """

    reason: str  # a loopline.vocabulary.Reason
    source: str  # what it was read as: DECISION, OBSERVATION or a score row
    step: str  # the step that refused it: ParseDecisions, EncodeDecisions, RunInference, ...
    detail: str
    payload: str | dict
    decision_id: str | None = None  # when the step knew it (scoring)

    def to_dict(self) -> dict:
        return {
            "reason": self.reason,
            "source": self.source,
            "step": self.step,
            "detail": self.detail,
            "decision_id": self.decision_id,
            "payload": self.payload,
        }


# The steps that parse each kind of event, as dead letters name them.
PARSE_STEPS = {DECISION: "ParseDecisions", OBSERVATION: "ParseObservations"}


def refusal(reason: str, kind: str, payload: str | dict, detail: str) -> DeadLetter:
    """A parse step's dead letter: an input of ``kind`` that could not become an event."""
    return DeadLetter(reason, kind, PARSE_STEPS[kind], detail, payload)


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Time


def parse_event_time(value: Any) -> int:
    """RFC 3339 with a zone, or integer epoch milliseconds, to epoch milliseconds.

    Raises ValueError with a sentence on anything else (no zone, a float, a bool, a time outside
    ``MIN_EVENT_TIME_MS`` .. ``MAX_EVENT_TIME_MS``; the sentence says when a number looks like
    epoch seconds or microseconds).
    """
    if isinstance(value, bool):
        raise ValueError(
            f"event_time must be RFC 3339 with a zone or epoch milliseconds, got {value!r}"
        )
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str):
        ms = _parse_rfc3339(value)
    else:
        raise ValueError(
            f"event_time must be RFC 3339 with a zone or epoch milliseconds, got {value!r}"
        )
    if not MIN_EVENT_TIME_MS <= ms < MAX_EVENT_TIME_MS:
        raise ValueError(f"event_time {value!r} is outside 2000-01-01..2100-01-01{_unit_hint(ms)}")
    return ms


def _unit_hint(ms: int) -> str:
    if MIN_EVENT_TIME_MS <= ms * 1000 < MAX_EVENT_TIME_MS:
        return "; it looks like epoch seconds, and event_time takes milliseconds"
    if MIN_EVENT_TIME_MS <= ms // 1000 < MAX_EVENT_TIME_MS:
        return "; it looks like epoch microseconds, and event_time takes milliseconds"
    return ""


def _parse_rfc3339(text: str) -> int:
    s = text.strip()
    if len(s) < 19 or s[10] not in "Tt ":
        raise ValueError(f"event_time {text!r} is not RFC 3339 (2026-11-01T12:00:00Z)")
    if s[-1] in "Zz":
        s = s[:-1] + "+00:00"
    # fromisoformat (3.10) accepts at most 6 fractional digits and only 3 or 6; normalise.
    head, sep, frac_and_zone = s.partition(".")
    if sep:
        i = 0
        while i < len(frac_and_zone) and frac_and_zone[i].isdigit():
            i += 1
        frac, zone = frac_and_zone[:i], frac_and_zone[i:]
        if not frac:
            raise ValueError(f"event_time {text!r} has an empty fraction")
        s = f"{head}.{(frac + '000000')[:6]}{zone}"
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"event_time {text!r} is not RFC 3339 (2026-11-01T12:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError(f"event_time {text!r} has no zone; add Z or an offset such as +09:00")
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def format_event_time(ms: int) -> str:
    """Epoch milliseconds to RFC 3339 in UTC with milliseconds (``2026-11-01T12:00:00.250Z``)."""
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_decision_json(
    payload: str | bytes, blueprint: Blueprint | None = None
) -> DecisionEvent | DeadLetter:
    """One JSON line to a DecisionEvent, validated against ``blueprint`` when given."""
    raw, not_utf8 = _decode(payload)
    try:
        if not_utf8:
            raise _Refused(BAD_JSON, not_utf8)
        return _decision(_load_json(raw), blueprint)
    except _Refused as r:
        return refusal(r.reason, DECISION, raw, r.detail)


def parse_observation_json(
    payload: str | bytes, blueprint: Blueprint | None = None
) -> ObservationEvent | DeadLetter:
    """One JSON line to an ObservationEvent; with a blueprint, the label value must be numeric."""
    raw, not_utf8 = _decode(payload)
    try:
        if not_utf8:
            raise _Refused(BAD_JSON, not_utf8)
        return _observation(_load_json(raw), blueprint)
    except _Refused as r:
        return refusal(r.reason, OBSERVATION, raw, r.detail)


def decision_from_record(
    record: Any, blueprint: Blueprint | None = None, payload: str | None = None
) -> DecisionEvent | DeadLetter:
    """A decoded record (Avro, BigQuery row, Pub/Sub JSON) to a DecisionEvent."""
    try:
        return _decision(record, blueprint)
    except _Refused as r:
        return refusal(
            r.reason, DECISION, payload if payload is not None else _dump(record), r.detail
        )


def observation_from_record(
    record: Any, blueprint: Blueprint | None = None, payload: str | None = None
) -> ObservationEvent | DeadLetter:
    """A decoded record (Avro, BigQuery row, Pub/Sub JSON) to an ObservationEvent."""
    try:
        return _observation(record, blueprint)
    except _Refused as r:
        return refusal(
            r.reason, OBSERVATION, payload if payload is not None else _dump(record), r.detail
        )


def validate_features(features: dict[str, Any], blueprint: Blueprint) -> tuple[str, str] | None:
    """(reason, detail) if ``features`` do not match the blueprint exactly, else None.

    The detail never shows the value of a feature the blueprint pseudonymises or drops.
    """
    declared = blueprint.feature_types
    for name in features:
        if name not in declared:
            return (
                UNKNOWN_FEATURE,
                f"feature {name!r} is not in blueprint {blueprint.name} v{blueprint.version}",
            )
    private = blueprint.privacy.pseudonymise + blueprint.privacy.drop
    for name, ftype in declared.items():
        if name not in features or features[name] is None:
            return MISSING_FEATURE, f"feature {name!r} ({ftype}) is missing"
        value = features[name]
        if not _has_type(value, ftype):
            shown = type(value).__name__ if name in private else _describe(value)
            return (
                FEATURE_TYPE,
                f"feature {name!r} must be {ftype}, got {shown}{_why(value, ftype)}",
            )
    return None


def _why(value: Any, ftype: str) -> str:
    """Why a value of about the right type still does not fit ``ftype``: '' when it is not that."""
    base = ftype.removesuffix("_list")
    for v in value if isinstance(value, list) else (value,):
        if base == "int" and _is_real(v) and isinstance(v, int) and not _is_int(v):
            return " (beyond the int64 range)"
        if base == "float" and _is_real(v) and not _is_number(v):
            return " (not finite or beyond the float32 range)"
        if base == "string" and isinstance(v, str) and not _is_string(v):
            return " (holds a lone surrogate, not valid Unicode)"
    return ""


def _decision(obj: Any, blueprint: Blueprint | None) -> DecisionEvent:
    if not isinstance(obj, dict):
        raise _Refused(
            NOT_AN_OBJECT, f"a decision event must be a JSON object, got {_describe(obj)}"
        )
    decision_id = _required_str(obj, "decision_id")
    decision_type = _required_str(obj, "decision_type")
    event_time_ms = _event_time(obj)
    features = obj.get("features")
    if features is None:
        raise _Refused(MISSING_FIELD, "field 'features' is missing")
    if not isinstance(features, dict):
        raise _Refused(WRONG_TYPE, f"field 'features' must be an object, got {_describe(features)}")
    version = obj.get("blueprint_version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise _Refused(
                WRONG_TYPE, f"field 'blueprint_version' must be a string, got {_describe(version)}"
            )
        version = str(version)
        if not _is_string(version):
            raise _Refused(WRONG_TYPE, "field 'blueprint_version' holds a lone surrogate")
    model_id = obj.get("model_id")
    if model_id is not None and not _is_string(model_id):
        raise _Refused(WRONG_TYPE, f"field 'model_id' must be a string, got {_describe(model_id)}")
    propensity = obj.get("propensity")
    if propensity is not None:
        if not _is_real(propensity) or not 0 <= propensity <= 1:
            raise _Refused(
                WRONG_TYPE,
                f"field 'propensity' must be a number in [0, 1], got {_describe(propensity)}",
            )
        propensity = float(propensity)
    score = obj.get("score")
    if score is not None:
        if not _is_finite(score):
            raise _Refused(
                WRONG_TYPE, f"field 'score' must be a finite number, got {_describe(score)}"
            )
        score = float(score)
    arm = obj.get("arm")
    if arm is not None and not (_is_string(arm) and arm):
        raise _Refused(WRONG_TYPE, f"field 'arm' must be a non-empty string, got {_describe(arm)}")
    if blueprint is not None:
        if decision_type != blueprint.name:
            raise _Refused(
                WRONG_DECISION_TYPE, f"decision_type {decision_type!r} is not {blueprint.name!r}"
            )
        problem = validate_features(features, blueprint)
        if problem:
            raise _Refused(*problem)
    return DecisionEvent(
        decision_id,
        decision_type,
        event_time_ms,
        features,
        version,
        obj.get("decision"),
        model_id,
        propensity,
        score,
        arm,
    )


def _observation(obj: Any, blueprint: Blueprint | None) -> ObservationEvent:
    if not isinstance(obj, dict):
        raise _Refused(
            NOT_AN_OBJECT, f"an observation event must be a JSON object, got {_describe(obj)}"
        )
    decision_id = _required_str(obj, "decision_id")
    event_time_ms = _event_time(obj)
    observations = obj.get("observations")
    if observations is None:
        raise _Refused(MISSING_FIELD, "field 'observations' is missing")
    if not isinstance(observations, dict):
        raise _Refused(
            WRONG_TYPE, f"field 'observations' must be an object, got {_describe(observations)}"
        )
    if blueprint is not None:
        key = blueprint.label.observation
        if key in observations:
            problem = _label_problem(observations[key], blueprint.label.type)
            if problem:
                raise _Refused(
                    LABEL_TYPE, f"observation {key!r} (the label's source) must be {problem}"
                )
    return ObservationEvent(decision_id, event_time_ms, observations)


def _label_problem(value: Any, label_type: str) -> str | None:
    """What the label's observation value must be, if ``value`` is not that; else None."""
    if isinstance(value, bool):
        return None
    if not _is_real(value):
        return f"a number, got {_describe(value)}"
    if label_type == "int" and not INT64_MIN <= value < 2**63:
        return f"a number within the int64 range (the label is int), got {_describe(value)}"
    if not _is_number(value):
        return f"a finite number within the float32 range, got {_describe(value)}"
    return None


def _required_str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise _Refused(MISSING_FIELD, f"field {key!r} is missing")
    if not isinstance(value, str):
        raise _Refused(WRONG_TYPE, f"field {key!r} must be a string, got {_describe(value)}")
    if not value:
        raise _Refused(WRONG_TYPE, f"field {key!r} is empty")
    if not _is_string(value):
        raise _Refused(WRONG_TYPE, f"field {key!r} holds a lone surrogate, not valid Unicode")
    return value


def _event_time(obj: dict) -> int:
    if obj.get("event_time") is None:
        raise _Refused(MISSING_FIELD, "field 'event_time' is missing")
    try:
        return parse_event_time(obj["event_time"])
    except ValueError as e:
        raise _Refused(BAD_TIME, str(e)) from None


def _load_json(raw: str) -> Any:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Refused(BAD_JSON, f"not valid JSON ({e})") from None
    # Cheap test first: only a line with many brackets can nest deeply.
    if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH and _depth(obj) > MAX_JSON_DEPTH:
        raise _Refused(BAD_JSON, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _depth(obj: Any) -> int:
    """How deeply lists and objects nest in ``obj`` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode(payload: str | bytes) -> tuple[str, str | None]:
    """The payload as text without a leading byte-order mark, and why it is refused if it is
    bytes that are not UTF-8: those are not parsed with replacement characters (which would
    score or join a mangled id), but the refusal's payload keeps them replaced."""
    if isinstance(payload, bytes | bytearray):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return payload.decode("utf-8", errors="replace"), f"not valid UTF-8 ({e})"
    return payload.removeprefix(_BOM), None


def _dump(record: Any) -> str:
    try:
        return json.dumps(record, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(record)


def _is_real(value: Any) -> bool:
    """An int or a float that is not a bool (of any size, possibly not finite)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number a float32 holds: finite and at most FLOAT32_MAX in magnitude."""
    # Compares exactly, also for an int too large for a float (where math.isfinite raises);
    # NaN compares false.
    return _is_real(value) and abs(value) <= FLOAT32_MAX


def _is_finite(value: Any) -> bool:
    """A real number a float64 holds finitely (an int too large for a float is not)."""
    if not _is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_int(value: Any) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
    )


def _is_string(value: Any) -> bool:
    """A str that can be written as UTF-8 (no lone surrogate from a JSON escape)."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Feature type -> (check of one value, is a list); built once, used for every feature of every row.
_BASE_CHECKS = {"int": _is_int, "float": _is_number, "string": _is_string}
_TYPE_CHECKS = {name: (check, False) for name, check in _BASE_CHECKS.items()} | {
    f"{name}_list": (check, True) for name, check in _BASE_CHECKS.items()
}


def _has_type(value: Any, ftype: str) -> bool:
    check, is_list = _TYPE_CHECKS[ftype]
    if is_list:
        return isinstance(value, list) and all(map(check, value))
    return check(value)


def _describe(value: Any) -> str:
    """A short description for a refusal's detail; a container only by its type and size, so
    a detail never copies what a payload holds (perhaps personal data) from deep inside it."""
    if isinstance(value, dict | list):
        n = len(value)
        return f"{type(value).__name__} of {n} {'item' if n == 1 else 'items'}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"int of {value.bit_length()} bits"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
