"""The blueprint's privacy applied to anything Loopline writes (DESIGN.md, "Join outputs").

No raw value of a field the blueprint pseudonymises or drops may reach a file a job writes,
dead letters included. Pure functions, free of Beam and TensorFlow, so every job applies the
same rules:

* ``pseudonymise``: the keyed HMAC-SHA256 of a value as 64 hex characters, the same digest the
  examples carry (``loopline.examples`` encodes with it);
* ``apply_privacy``: a features mapping with dropped fields removed and pseudonymised ones
  hashed, at any depth;
* ``redact_payload``: a refused input as it may be written to ``rejected/`` or ``failed/``. A
  JSON object keeps its shape with the privacy applied at any depth (so ``features``, nested
  mappings in it and top-level copies of those field names alike), and a ``features`` that is
  not an object becomes a digest; anything else (not UTF-8, not JSON, JSON but not an object)
  becomes ``{"sha256", "length"}`` of its bytes only.

``PayloadPrivacy`` holds what a parse step needs (the field names and the key; frozen and
picklable, so it travels to Beam workers as configuration). With ``quarantine`` set, the parse
step also emits each refused raw payload as a ``QuarantinedPayload`` on its own output, which
the caller writes to a location with its own access control (``--quarantine DIR``); the raw
bytes go nowhere else.

    >>> privacy = PayloadPrivacy.from_blueprint(blueprint, key=b"k")
    >>> privacy.redact(b'{"decision_id": "d1", "features": {"user_id": "u-1", "email": "a@b"}}')
    {'decision_id': 'd1', 'features': {'user_id': '6f0c...'}}
    >>> privacy.redact(b'{"decision_id": "d1", "feat')
    {'sha256': '9b1e...', 'length': 26}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

_BOM = "\ufeff"


def pseudonymise(value: str, key: bytes) -> str:
    """The keyed HMAC-SHA256 of ``value`` as 64 hex characters; stable for a given key.

    >>> pseudonymise("u-1", b"k") == pseudonymise("u-1", b"k") != pseudonymise("u-1", b"k2")
    True
    """
    # surrogatepass: a lone surrogate (from a JSON escape) is hashed, not an error; every valid
    # string encodes exactly as plain UTF-8.
    return hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def digest(raw: bytes | str) -> dict:
    """``{"sha256", "length"}`` of ``raw``'s bytes (a str as UTF-8): all that is kept of a
    payload whose fields cannot be told apart."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


def apply_privacy(features: dict, blueprint: Any, key: bytes | None) -> dict:
    """``features`` without the dropped fields and with the pseudonymised ones hashed, at any
    depth (mappings inside mappings and lists). ``blueprint`` is a ``Blueprint``, its
    ``Privacy`` or a ``PayloadPrivacy``.

    A pseudonymised string is hashed as ``pseudonymise`` does, a list element by element, any
    other value as its canonical JSON. Raises ValueError when something must be hashed and
    ``key`` is None.
    """
    hashed, dropped = _names(blueprint)
    return _walk(features, hashed, dropped, key)


def redact_payload(raw: bytes | str, blueprint: Any, key: bytes | None) -> dict:
    """A refused payload as it may be written (see the module docstring); never raises on bad
    input. ``blueprint`` as for ``apply_privacy``."""
    hashed, dropped = _names(blueprint)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        obj = json.loads(text.removeprefix(_BOM))
        if not isinstance(obj, dict):
            return digest(raw)
        if "features" in obj and not isinstance(obj["features"], dict):
            obj["features"] = digest(_canonical(obj["features"]))
        return _walk(obj, hashed, dropped, key)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep to walk
        return digest(raw)


def _names(blueprint: Any) -> tuple[frozenset, frozenset]:
    privacy = getattr(blueprint, "privacy", blueprint)
    return frozenset(privacy.pseudonymise), frozenset(privacy.drop)


def _walk(value: Any, hashed: frozenset, dropped: frozenset, key: bytes | None) -> Any:
    if isinstance(value, dict):
        return {
            name: _hash(v, key, name) if name in hashed else _walk(v, hashed, dropped, key)
            for name, v in value.items()
            if name not in dropped
        }
    if isinstance(value, list):
        return [_walk(v, hashed, dropped, key) for v in value]
    return value


def _hash(value: Any, key: bytes | None, name: str) -> Any:
    if value is None:
        return None
    if key is None:
        raise ValueError(f"field {name!r} must be pseudonymised but no key was given")
    if isinstance(value, str):
        return pseudonymise(value, key)
    if isinstance(value, list):
        return [_hash(v, key, name) for v in value]
    return pseudonymise(_canonical(value), key)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class QuarantinedPayload:
    """A refused input's raw bytes, for the quarantine location only; ``sha256`` is the digest
    a redacted refusal of the same input carries when its payload did not parse."""

    source: str  # "decision" or "observation"
    reason: str
    raw: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def to_json(self) -> str:
        """One JSON line: the payload as text when it is UTF-8, else as base64."""
        out = {"source": self.source, "reason": self.reason, "sha256": self.sha256}
        try:
            out["payload"] = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            out["payload_base64"] = base64.b64encode(self.raw).decode("ascii")
        return json.dumps(out, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class PayloadPrivacy:
    """What a step that writes refused payloads needs: the blueprint's pseudonymised and dropped
    field names, the key (never in ``repr``), and whether raw payloads go to a quarantine.

        >>> ParseDecisions(blueprint, privacy=PayloadPrivacy.from_blueprint(blueprint, key))
    """

    pseudonymise: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    key: bytes | None = field(default=None, repr=False)
    quarantine: bool = False

    def __post_init__(self):
        if self.pseudonymise and not self.key:
            raise ValueError(
                f"payloads must pseudonymise {', '.join(self.pseudonymise)} but no key was given"
            )

    @classmethod
    def from_blueprint(
        cls, blueprint: Any, key: bytes | None, quarantine: bool = False
    ) -> PayloadPrivacy:
        privacy = blueprint.privacy
        return cls(tuple(privacy.pseudonymise), tuple(privacy.drop), key, quarantine)

    def redact(self, raw: bytes | str) -> dict:
        """``redact_payload`` with this privacy and key."""
        return redact_payload(raw, self, self.key)


__all__ = [
    "PayloadPrivacy",
    "QuarantinedPayload",
    "apply_privacy",
    "digest",
    "pseudonymise",
    "redact_payload",
]
