"""Blueprints: the versioned description of one decision type (DESIGN.md, "Blueprint").

A blueprint names the features a decision is made from (with their types), how the label is
computed from delayed observations, how examples are split, the sections owned by later
stages (``model``, ``policy``, ``monitor``), which are kept as plain mappings here, and the
``rollout`` section (how a challenger model earns traffic), which is validated here.

    >>> bp = load_blueprint("examples/notify.yaml")
    >>> bp.label.window_ms
    3600000
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FEATURE_TYPES = ("int", "float", "string", "int_list", "float_list", "string_list")
AGGREGATIONS = ("sum", "max", "min", "mean", "count", "earliest", "latest")
LABEL_TYPES = ("int", "float")
METRIC_KINDS = ("rate", "mean")
DIRECTIONS = ("increase", "decrease")
DEFAULT_PII_KEY_ENV = "LOOPLINE_PII_KEY"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the join writes next to the features; a feature may not shadow them.
RESERVED_NAMES = frozenset(
    {
        "decision_id",
        "decision_time_ms",
        "join_status",
        "blueprint_version",
        "model_id",
        "propensity",
        "decision",
        "arm",
    }
)


class BlueprintError(ValueError):
    """A blueprint that cannot be used, naming the file, the field and what is wrong."""

    def __init__(self, source: str, field_path: str, problem: str):
        self.source = source
        self.field_path = field_path
        self.problem = problem
        super().__init__(f"{source}: {field_path}: {problem}")


def parse_duration(value: Any) -> int:
    """Parses ``90s``, ``15m``, ``1h``, ``2d`` (or ``250ms``) into milliseconds.

    A bare number is taken as seconds. Negative durations are refused.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '2d', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return int(round(value * 1000))
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '2d', got {value!r}")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '2d', got {value!r}")
    amount, unit = match.groups()
    return int(round(float(amount) * _UNIT_MS[unit]))


def format_duration(ms: int) -> str:
    """The shortest exact spelling of a duration in milliseconds (``3600000`` -> ``1h``)."""
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class Feature:
    """One decision-time feature: its name and one of FEATURE_TYPES."""

    name: str
    type: str

    @property
    def is_list(self) -> bool:
        return self.type.endswith("_list")

    @property
    def base_type(self) -> str:
        """``int``, ``float`` or ``string``, the element type for lists."""
        return self.type.removesuffix("_list")


# The decision-provenance columns of an example that ``label.observable_when`` may name, with
# the type of their values. The join writes each of them into every example, explicit when the
# decision did not carry it: decision -1, arm and model_id empty.
OBSERVABLE_COLUMNS = {"decision": "int", "arm": "string", "model_id": "string"}
DEFAULT_IPS_CLIP = 10.0


@dataclass(frozen=True)
class Label:
    """How the label is computed from the observations of one decision, and when it means
    anything at all.

    ``observable_when`` maps provenance columns to the values for which the label was
    observable (``{"decision": (1,)}``: a click is only possible on a notification that was
    sent); a row is observable when each named column holds one of its values. Training learns
    from observable rows only, each weighted by its inverse propensity capped at ``ips_clip``.
    Empty: every row is observable.
    """

    name: str
    observation: str
    aggregation: str
    window_ms: int
    backward_slack_ms: int
    default: int | float
    type: str  # "int" or "float"
    observable_when: tuple[tuple[str, tuple[int | str, ...]], ...] = ()
    ips_clip: float = DEFAULT_IPS_CLIP

    def is_observable(self, provenance: dict[str, Any]) -> bool:
        """Whether the label of a row with these provenance values was observable.

        A column the row does not carry at all (a span written before the join recorded
        provenance) does not restrict it; an explicit absent value (-1, "") does, unless listed.

        >>> label.is_observable({"decision": 0})   # observable_when: {decision: [1]}
        False
        """
        return all(
            column not in provenance or provenance[column] in values
            for column, values in self.observable_when
        )

    def counts(self, decision_time_ms: int, observation_time_ms: int) -> bool:
        """Whether an observation at that time falls in this decision's label window."""
        return (
            decision_time_ms - self.backward_slack_ms
            <= observation_time_ms
            <= decision_time_ms + self.window_ms
        )


@dataclass(frozen=True)
class Privacy:
    """Identifier fields to pseudonymise (keyed HMAC-SHA256) and fields to drop.

    The key never lives in the blueprint: it is read from the environment variable ``key_env``
    (or a secret mounted there) when a pipeline starts.
    """

    pseudonymise: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    key_env: str = DEFAULT_PII_KEY_ENV


@dataclass(frozen=True)
class Guardrail:
    """A metric the challenger must not make worse: an observation key aggregated per decision
    (with the label's window), and the direction that is good for it."""

    name: str
    observation: str
    aggregation: str
    direction: str  # "increase" (higher is better) or "decrease" (lower is better)


@dataclass(frozen=True)
class Rollout:
    """How a challenger model earns traffic (the blueprint's ``rollout`` section).

    Units (values of the feature ``unit``) are assigned to the challenger with probability
    ``challenger_share`` by a salted hash (``loopline.experiment.assign_arm``), so a unit keeps
    its arm across days and processes whatever the model scores. The primary metric is the
    blueprint's label, read as a ``rate`` or a ``mean``; guardrails are other observation keys.
    ``alpha`` is the significance level of the sequential test, ``min_exposure`` the decisions
    each arm needs before any verdict, ``max_days`` how long an inconclusive split may last,
    and ``srm_alpha`` the level of the sample-ratio-mismatch check.
    """

    unit: str
    challenger_share: float
    salt: str
    metric: str = "rate"
    direction: str = "increase"
    guardrails: tuple[Guardrail, ...] = ()
    alpha: float = 0.05
    min_exposure: int = 1000
    max_days: int = 14
    srm_alpha: float = 0.001


@dataclass(frozen=True)
class Blueprint:
    """A parsed, validated blueprint. ``content_hash`` identifies this exact version."""

    name: str
    version: str
    features: tuple[Feature, ...]
    label: Label
    eval_fraction: float
    model: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    monitor: dict = field(default_factory=dict)
    privacy: Privacy = Privacy()
    rollout: Rollout | None = None
    content_hash: str = ""
    source: str = "<blueprint>"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def feature_types(self) -> dict[str, str]:
        return {f.name: f.type for f in self.features}

    @property
    def example_features(self) -> tuple[Feature, ...]:
        """The features that reach the examples: all but the dropped ones."""
        return tuple(f for f in self.features if f.name not in self.privacy.drop)

    @property
    def fallback_decision(self) -> Any:
        """The decision a client makes while no model is available (``policy.fallback``)."""
        return self.policy.get("fallback", 0)

    def summary(self) -> dict:
        """What a manifest or model record says about the blueprint it was made with."""
        return {"name": self.name, "version": self.version, "content_hash": self.content_hash}


def load_blueprint(path: str | Path) -> Blueprint:
    """Loads and validates a blueprint YAML file; raises BlueprintError naming what is wrong."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BlueprintError(source, "<file>", f"cannot be read ({e.strerror or e})") from None
    return parse_blueprint(text, source=source)


def parse_blueprint(text: str, source: str = "<blueprint>") -> Blueprint:
    """Parses blueprint YAML text; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BlueprintError(source, "<yaml>", f"is not valid YAML ({e})") from None
    return blueprint_from_dict(data, source=source)


def content_hash(data: dict) -> str:
    """SHA-256 of the blueprint's canonical JSON form: comments and layout do not change it."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def blueprint_from_dict(data: Any, source: str = "<blueprint>") -> Blueprint:
    """Validates a blueprint mapping (as loaded from YAML)."""
    check = _Checker(source)
    if not isinstance(data, dict):
        raise BlueprintError(source, "<top>", "must be a mapping of blueprint fields")
    known = {
        "name",
        "version",
        "features",
        "label",
        "eval_fraction",
        "model",
        "policy",
        "monitor",
        "privacy",
        "rollout",
        "description",
    }
    for key in data:
        if key not in known:
            raise BlueprintError(
                source, str(key), f"is not a blueprint field (known: {', '.join(sorted(known))})"
            )

    name = check.identifier(data, "name")
    version = data.get("version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int | str)
        or str(version).strip() == ""
    ):
        raise BlueprintError(
            source, "version", "is required: a number or a string such as 3 or '2026-11'"
        )
    features = check.features(data.get("features"))
    label = check.label(data.get("label"), {f.name for f in features})
    eval_fraction = data.get("eval_fraction", 0.2)
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, int | float)
        or not 0 <= eval_fraction < 1
    ):
        raise BlueprintError(
            source, "eval_fraction", f"must be a number in [0, 1), got {eval_fraction!r}"
        )
    sections = {}
    for key in ("model", "policy", "monitor"):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise BlueprintError(source, key, "must be a mapping")
        sections[key] = value
    privacy = check.privacy(data.get("privacy"), features)
    rollout = check.rollout(data.get("rollout"), features, label)
    return Blueprint(
        name=name,
        version=str(version),
        features=features,
        label=label,
        eval_fraction=float(eval_fraction),
        privacy=privacy,
        rollout=rollout,
        content_hash=content_hash(data),
        source=source,
        **sections,
    )


class _Checker:
    """Field-level validation that reports the file and the field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str) -> BlueprintError:
        return BlueprintError(self.source, path, problem)

    def identifier(self, data: dict, key: str, path: str | None = None) -> str:
        path = path or key
        value = data.get(key)
        if value is None:
            raise self.fail(path, "is required")
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(path, f"must be an identifier (letters, digits, _), got {value!r}")
        return value

    def features(self, value: Any) -> tuple[Feature, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail("features", "must be a non-empty list of {name, type}")
        features, seen = [], set()
        for i, item in enumerate(value):
            path = f"features[{i}]"
            if not isinstance(item, dict):
                raise self.fail(path, "must be a mapping with name and type")
            name = self.identifier(item, "name", f"{path}.name")
            if name in seen:
                raise self.fail(f"{path}.name", f"{name!r} is declared twice")
            if name in RESERVED_NAMES:
                raise self.fail(f"{path}.name", f"{name!r} is reserved for the join's own columns")
            ftype = item.get("type")
            if ftype not in FEATURE_TYPES:
                raise self.fail(
                    f"{path}.type", f"must be one of {', '.join(FEATURE_TYPES)}, got {ftype!r}"
                )
            extra = set(item) - {"name", "type", "description"}
            if extra:
                raise self.fail(path, f"unknown keys {sorted(extra)}")
            seen.add(name)
            features.append(Feature(name, ftype))
        return tuple(features)

    def label(self, value: Any, feature_names: set[str]) -> Label:
        if not isinstance(value, dict):
            raise self.fail(
                "label",
                "is required: a mapping with name, observation, aggregation, window, default",
            )
        name = self.identifier(value, "name", "label.name")
        if name in feature_names or name in RESERVED_NAMES:
            raise self.fail("label.name", f"{name!r} collides with a feature or a join column")
        observation = value.get("observation")
        if not isinstance(observation, str) or not observation:
            raise self.fail(
                "label.observation", "is required: the observation key the label is computed from"
            )
        aggregation = value.get("aggregation", "max")
        if aggregation not in AGGREGATIONS:
            raise self.fail(
                "label.aggregation",
                f"must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}",
            )
        window_ms = self.duration(value, "window", required=True)
        if window_ms <= 0:
            raise self.fail("label.window", "must be longer than zero")
        slack_ms = self.duration(value, "backward_slack", required=False)
        default = value.get("default", 0)
        if isinstance(default, bool) or not isinstance(default, int | float):
            raise self.fail("label.default", f"must be a number, got {default!r}")
        ltype = value.get("type")
        if ltype is None:
            ltype = "float" if aggregation == "mean" or isinstance(default, float) else "int"
        if ltype not in LABEL_TYPES:
            raise self.fail("label.type", f"must be int or float, got {ltype!r}")
        if ltype == "int" and aggregation == "mean":
            raise self.fail("label.type", "a mean label is a float; set type: float or drop type")
        extra = set(value) - {
            "name",
            "observation",
            "aggregation",
            "window",
            "backward_slack",
            "default",
            "type",
            "observable_when",
            "ips_clip",
            "description",
        }
        if extra:
            raise self.fail("label", f"unknown keys {sorted(extra)}")
        return Label(
            name,
            observation,
            aggregation,
            window_ms,
            slack_ms,
            int(default) if ltype == "int" else float(default),
            ltype,
            self.observable_when(value.get("observable_when")),
            self.ips_clip(value.get("ips_clip", DEFAULT_IPS_CLIP)),
        )

    def observable_when(self, value: Any) -> tuple[tuple[str, tuple[int | str, ...]], ...]:
        path = "label.observable_when"
        if value is None:
            return ()
        if not isinstance(value, dict) or not value:
            raise self.fail(
                path, "must map a provenance column to its observable values, e.g. {decision: [1]}"
            )
        conditions = []
        for column, values in value.items():
            if column not in OBSERVABLE_COLUMNS:
                raise self.fail(
                    path,
                    f"{column!r} is not a provenance column (one of "
                    f"{', '.join(sorted(OBSERVABLE_COLUMNS))})",
                )
            ctype = OBSERVABLE_COLUMNS[column]
            python_type = int if ctype == "int" else str
            if (
                not isinstance(values, list)
                or not values
                or not all(type(v) is python_type for v in values)
            ):
                raise self.fail(
                    f"{path}.{column}", f"must be a non-empty list of {ctype}s, got {values!r}"
                )
            conditions.append((column, tuple(dict.fromkeys(values))))
        return tuple(conditions)

    def ips_clip(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
            raise self.fail(
                "label.ips_clip",
                f"must be a number >= 1 (the largest inverse-propensity weight), got {value!r}",
            )
        return float(value)

    def duration(self, data: dict, key: str, required: bool) -> int:
        if key not in data:
            if required:
                raise self.fail(
                    f"label.{key}", "is required: a duration such as 90s, 15m, 1h or 2d"
                )
            return 0
        try:
            return parse_duration(data[key])
        except ValueError as e:
            raise self.fail(f"label.{key}", str(e)) from None

    def privacy(self, value: Any, features: tuple[Feature, ...]) -> Privacy:
        if value is None:
            return Privacy()
        if not isinstance(value, dict):
            raise self.fail("privacy", "must be a mapping with pseudonymise and/or drop lists")
        types = {f.name: f.type for f in features}
        lists = {}
        for key in ("pseudonymise", "drop"):
            names = value.get(key) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise self.fail(f"privacy.{key}", "must be a list of feature names")
            for n in names:
                if n not in types:
                    raise self.fail(f"privacy.{key}", f"{n!r} is not a declared feature")
            lists[key] = tuple(names)
        for n in lists["pseudonymise"]:
            if types[n] not in ("string", "string_list"):
                raise self.fail(
                    "privacy.pseudonymise",
                    f"{n!r} is a {types[n]}; only string identifiers can be pseudonymised",
                )
        both = set(lists["pseudonymise"]) & set(lists["drop"])
        if both:
            raise self.fail("privacy", f"{sorted(both)} cannot be both pseudonymised and dropped")
        key_env = value.get("key_env", DEFAULT_PII_KEY_ENV)
        if not isinstance(key_env, str) or not key_env:
            raise self.fail("privacy.key_env", "must name an environment variable")
        extra = set(value) - {"pseudonymise", "drop", "key_env"}
        if extra:
            raise self.fail("privacy", f"unknown keys {sorted(extra)}")
        return Privacy(lists["pseudonymise"], lists["drop"], key_env)

    def rollout(self, value: Any, features: tuple[Feature, ...], label: Label) -> Rollout | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(
                "rollout",
                "must be a mapping with unit, challenger_share, salt and the test settings",
            )
        extra = set(value) - {
            "unit",
            "challenger_share",
            "salt",
            "primary",
            "guardrails",
            "alpha",
            "min_exposure",
            "max_days",
            "srm_alpha",
            "description",
        }
        if extra:
            raise self.fail("rollout", f"unknown keys {sorted(extra)}")
        types = {f.name: f.type for f in features}
        unit = value.get("unit")
        if not isinstance(unit, str) or unit not in types:
            raise self.fail(
                "rollout.unit", f"must name a declared feature (such as user_id), got {unit!r}"
            )
        if types[unit] not in ("string", "int"):
            raise self.fail(
                "rollout.unit", f"{unit!r} is a {types[unit]}; the unit must be a string or an int"
            )
        share = self.fraction(value, "challenger_share", None, "rollout.challenger_share")
        salt = value.get("salt")
        if not isinstance(salt, str) or not salt.strip():
            raise self.fail(
                "rollout.salt", "is required: a string that makes this rollout's assignment its own"
            )
        metric, direction = self.primary(value.get("primary"), label)
        guardrails = self.guardrails(value.get("guardrails"), label)
        alpha = self.fraction(value, "alpha", 0.05, "rollout.alpha", upper=0.5)
        srm_alpha = self.fraction(value, "srm_alpha", 0.001, "rollout.srm_alpha", upper=0.5)
        min_exposure = self.count(value, "min_exposure", 1000)
        max_days = self.count(value, "max_days", 14)
        return Rollout(
            unit=unit,
            challenger_share=share,
            salt=salt,
            metric=metric,
            direction=direction,
            guardrails=guardrails,
            alpha=alpha,
            min_exposure=min_exposure,
            max_days=max_days,
            srm_alpha=srm_alpha,
        )

    def fraction(
        self, data: dict, key: str, default: float | None, path: str, upper: float = 1.0
    ) -> float:
        value = data.get(key, default)
        if value is None:
            raise self.fail(path, f"is required: a number between 0 and {upper:g}, exclusive")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < upper:
            raise self.fail(
                path, f"must be a number between 0 and {upper:g}, exclusive, got {value!r}"
            )
        return float(value)

    def count(self, data: dict, key: str, default: int) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"rollout.{key}", f"must be a positive integer, got {value!r}")
        return value

    def direction(self, value: Any, path: str) -> str:
        if value not in DIRECTIONS:
            raise self.fail(
                path, f"must be increase or decrease (the way that is better), got {value!r}"
            )
        return value

    def primary(self, value: Any, label: Label) -> tuple[str, str]:
        """The primary metric is the label; this reads how (``rate`` or ``mean``) and which way."""
        default_metric = "rate" if label.type == "int" else "mean"
        if value is None:
            return default_metric, "increase"
        if not isinstance(value, dict):
            raise self.fail("rollout.primary", "must be a mapping with metric and direction")
        extra = set(value) - {"metric", "direction"}
        if extra:
            raise self.fail(
                "rollout.primary",
                f"unknown keys {sorted(extra)} (the primary metric is always the label)",
            )
        metric = value.get("metric", default_metric)
        if metric not in METRIC_KINDS:
            raise self.fail("rollout.primary.metric", f"must be rate or mean, got {metric!r}")
        if metric == "rate" and label.type != "int":
            raise self.fail(
                "rollout.primary.metric",
                f"a rate needs an int (0/1) label; {label.name!r} is a float",
            )
        direction = self.direction(value.get("direction", "increase"), "rollout.primary.direction")
        return metric, direction

    def guardrails(self, value: Any, label: Label) -> tuple[Guardrail, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(
                "rollout.guardrails", "must be a list of {observation, direction, aggregation}"
            )
        guardrails, seen = [], {label.name}
        for i, item in enumerate(value):
            path = f"rollout.guardrails[{i}]"
            if not isinstance(item, dict):
                raise self.fail(path, "must be a mapping with observation, direction, aggregation")
            extra = set(item) - {"name", "observation", "direction", "aggregation", "description"}
            if extra:
                raise self.fail(path, f"unknown keys {sorted(extra)}")
            observation = item.get("observation")
            if not isinstance(observation, str) or not observation:
                raise self.fail(f"{path}.observation", "is required: an observation key")
            aggregation = item.get("aggregation", "max")
            if aggregation not in AGGREGATIONS:
                raise self.fail(
                    f"{path}.aggregation",
                    f"must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}",
                )
            direction = self.direction(item.get("direction"), f"{path}.direction")
            if "name" in item:
                name = self.identifier(item, "name", f"{path}.name")
            else:
                name = f"{observation}_{aggregation}"
            if name in seen:
                raise self.fail(
                    f"{path}.name", f"{name!r} is already the label or another guardrail"
                )
            seen.add(name)
            guardrails.append(Guardrail(name, observation, aggregation, direction))
        return tuple(guardrails)
