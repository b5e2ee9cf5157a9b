"""Decision and observation events, and their parsing (DESIGN.md, "Event contract").

Parsing never raises on bad input: every parser returns either an event or a ``Refusal`` that
carries a reason code, a sentence saying what is wrong, and the raw payload, so a Beam DoFn can
route it to a dead-letter output.

    >>> parse_decision_json('{"decision_id": "d1", "decision_type": "notify", '
    ...                     '"event_time": "2026-11-01T12:00:00Z", "features": {}}')
    DecisionEvent(decision_id='d1', ...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loopline.blueprint import Blueprint

DECISION = "decision"
OBSERVATION = "observation"

# Reason codes of a refusal; DESIGN.md's rejected/ output carries them as "reason".
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TIME = "bad_time"
UNKNOWN_FEATURE = "unknown_feature"
MISSING_FEATURE = "missing_feature"
FEATURE_TYPE = "feature_type"
WRONG_DECISION_TYPE = "wrong_decision_type"
LABEL_TYPE = "label_type"
BAD_AVRO = "bad_avro"
REASONS = (
    BAD_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_TIME,
    UNKNOWN_FEATURE,
    MISSING_FEATURE,
    FEATURE_TYPE,
    WRONG_DECISION_TYPE,
    LABEL_TYPE,
    BAD_AVRO,
)

# Epoch milliseconds outside [1970, 9999] are almost always a unit mistake (seconds, micros).
_MIN_TIME_MS = 0
_MAX_TIME_MS = 253402300799999


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

    def to_dict(self) -> dict:
        """The event in its JSON form (event_time as RFC 3339), omitting absent optionals."""
        out = {
            "decision_id": self.decision_id,
            "decision_type": self.decision_type,
            "event_time": format_event_time(self.event_time_ms),
            "features": self.features,
        }
        for key in ("blueprint_version", "decision", "model_id", "propensity"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def with_choice(self, decision: Any, propensity: float, model_id: str | None) -> DecisionEvent:
        """This event as logged once a policy chose: the decision, its propensity, the model.

        >>> event.with_choice(1, 0.975, "notify-1").propensity
        0.975
        """
        from dataclasses import replace  # here, to keep this method one self-contained hunk

        return replace(self, decision=decision, model_id=model_id, propensity=float(propensity))


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
class Refusal:
    """Why an input could not become an event; goes to ``rejected/`` with the raw payload."""

    reason: str
    source: str  # DECISION or OBSERVATION
    payload: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "payload": self.payload,
        }


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Time


def parse_event_time(value: Any) -> int:
    """RFC 3339 with a zone, or integer epoch milliseconds, to epoch milliseconds.

    Raises ValueError with a sentence on anything else (no zone, a float, a bool, out of range).
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
    if not _MIN_TIME_MS <= ms <= _MAX_TIME_MS:
        raise ValueError(f"event_time {value!r} is outside 1970..9999")
    return ms


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
) -> DecisionEvent | Refusal:
    """One JSON line to a DecisionEvent, validated against ``blueprint`` when given."""
    raw, not_utf8 = _decode(payload)
    try:
        if not_utf8:
            raise _Refused(BAD_JSON, not_utf8)
        return _decision(_load_json(raw), blueprint)
    except _Refused as r:
        return Refusal(r.reason, DECISION, raw, r.detail)


def parse_observation_json(
    payload: str | bytes, blueprint: Blueprint | None = None
) -> ObservationEvent | Refusal:
    """One JSON line to an ObservationEvent; with a blueprint, the label value must be numeric."""
    raw, not_utf8 = _decode(payload)
    try:
        if not_utf8:
            raise _Refused(BAD_JSON, not_utf8)
        return _observation(_load_json(raw), blueprint)
    except _Refused as r:
        return Refusal(r.reason, OBSERVATION, raw, r.detail)


def decision_from_record(
    record: Any, blueprint: Blueprint | None = None, payload: str | None = None
) -> DecisionEvent | Refusal:
    """A decoded record (Avro, BigQuery row, Pub/Sub JSON) to a DecisionEvent."""
    try:
        return _decision(record, blueprint)
    except _Refused as r:
        return Refusal(
            r.reason, DECISION, payload if payload is not None else _dump(record), r.detail
        )


def observation_from_record(
    record: Any, blueprint: Blueprint | None = None, payload: str | None = None
) -> ObservationEvent | Refusal:
    """A decoded record (Avro, BigQuery row, Pub/Sub JSON) to an ObservationEvent."""
    try:
        return _observation(record, blueprint)
    except _Refused as r:
        return Refusal(
            r.reason, OBSERVATION, payload if payload is not None else _dump(record), r.detail
        )


def validate_features(features: dict[str, Any], blueprint: Blueprint) -> tuple[str, str] | None:
    """(reason, detail) if ``features`` do not match the blueprint exactly, else None."""
    declared = blueprint.feature_types
    for name in features:
        if name not in declared:
            return (
                UNKNOWN_FEATURE,
                f"feature {name!r} is not in blueprint {blueprint.name} v{blueprint.version}",
            )
    for name, ftype in declared.items():
        if name not in features or features[name] is None:
            return MISSING_FEATURE, f"feature {name!r} ({ftype}) is missing"
        if not _has_type(features[name], ftype):
            return (
                FEATURE_TYPE,
                f"feature {name!r} must be {ftype}, got {_describe(features[name])}",
            )
    return None


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
    model_id = obj.get("model_id")
    if model_id is not None and not isinstance(model_id, str):
        raise _Refused(WRONG_TYPE, f"field 'model_id' must be a string, got {_describe(model_id)}")
    propensity = obj.get("propensity")
    if propensity is not None:
        if not _is_number(propensity) or not 0 <= propensity <= 1:
            raise _Refused(
                WRONG_TYPE, f"field 'propensity' must be a number in [0, 1], got {propensity!r}"
            )
        propensity = float(propensity)
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
        if (
            key in observations
            and not _is_number(observations[key])
            and not isinstance(observations[key], bool)
        ):
            raise _Refused(
                LABEL_TYPE,
                f"observation {key!r} (the label's source) must be a number, got {_describe(observations[key])}",
            )
    return ObservationEvent(decision_id, event_time_ms, observations)


def _required_str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise _Refused(MISSING_FIELD, f"field {key!r} is missing")
    if not isinstance(value, str):
        raise _Refused(WRONG_TYPE, f"field {key!r} must be a string, got {_describe(value)}")
    if not value:
        raise _Refused(WRONG_TYPE, f"field {key!r} is empty")
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
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Refused(BAD_JSON, f"not valid JSON ({e})") from None


def _decode(payload: str | bytes) -> tuple[str, str | None]:
    """The payload as text, and why it is refused if it is bytes that are not UTF-8: those are
    not parsed with replacement characters (which would score or join a mangled id), but the
    refusal's payload keeps them replaced."""
    if isinstance(payload, bytes | bytearray):
        try:
            return payload.decode("utf-8"), None
        except UnicodeDecodeError as e:
            return payload.decode("utf-8", errors="replace"), f"not valid UTF-8 ({e})"
    return payload, None


def _dump(record: Any) -> str:
    try:
        return json.dumps(record, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(record)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


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
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
