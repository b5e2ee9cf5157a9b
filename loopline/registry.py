"""The model registry of a serving directory: which pushed model serves which traffic.

The Pusher writes versions; the registry names them (DESIGN.md, "Registry")::

    SERVING/<version>/               the SavedModel the Pusher pushed
    SERVING/<version>.record.json    its record (pipelines.model_record): "model_id" (a UUID),
                                     "name" (``<blueprint>-<version>``), what it was trained on
    SERVING/aliases.json             {"production": id|null, "challenger": id|null,
                                      "previous": id|null,
                                      "history": [{"at", "alias", "from", "to", "why"}, ...]}

Scoring asks for an alias (``production``, and ``challenger`` during a rollout), a model id or
a version directory name, never for "the newest directory". A model reaches traffic only
through these moves, each appended to ``history`` with its reason:

- ``register``: a blessed push becomes the ``challenger`` (never ``production``, not even the
  first model, which is compared with the blueprint's fallback decision), unless another
  challenger is still under test;
- ``promote``: the challenger becomes ``production``, the old production ``previous``;
- ``roll_back``: the challenger leaves traffic, or production goes back to ``previous``.

    >>> register("gs://b/serving/notify", record)          # record of a blessed push
    >>> promote("gs://b/serving/notify", "challenger_better: ctr +1.2% (p=0.003)")
    >>> resolve("gs://b/serving/notify", "production").model_id
    'a0c5…'

Every update reads ``aliases.json``, changes it and replaces it through
``loopline.storage.replace_if_unchanged``: a reader never sees a torn file, and an update that
another writer made after our read raises ``storage.ConcurrentUpdate`` instead of being lost
(see that function for the exact guarantee on GCS).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from loopline import storage

ALIASES = "aliases.json"
PRODUCTION = "production"
CHALLENGER = "challenger"
PREVIOUS = "previous"
ALIAS_NAMES = (PRODUCTION, CHALLENGER, PREVIOUS)
RECORD_SUFFIX = ".record.json"
SAVED_MODEL = "saved_model.pb"
_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class RegistryError(ValueError):
    """A registry that cannot do what was asked, in one sentence."""


class ModelNotFound(RegistryError):
    """No usable pushed model where one was expected, in one sentence."""


class ChallengerInTraffic(RegistryError):
    """A new push cannot become the challenger while another one is still under test."""


def now() -> str:
    """The current UTC time as the registry writes it (RFC 3339, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Aliases:
    """The content of ``aliases.json``: a model id (or None) per alias, and every move so far."""

    production: str | None = None
    challenger: str | None = None
    previous: str | None = None
    history: tuple[Mapping[str, Any], ...] = field(default=())

    def moved(self, alias: str, to: str | None, why: str, at: str) -> Aliases:
        """These aliases with ``alias`` pointing at ``to``, the move appended to history."""
        move = {"at": at, "alias": alias, "from": getattr(self, alias), "to": to, "why": why}
        return replace(self, **{alias: to}, history=(*self.history, move))

    def to_dict(self) -> dict:
        return {
            PRODUCTION: self.production,
            CHALLENGER: self.challenger,
            PREVIOUS: self.previous,
            "history": [dict(move) for move in self.history],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Aliases:
        """Aliases from parsed JSON; RegistryError naming ``source`` when it is not one."""
        if not isinstance(data, dict):
            raise RegistryError(f"{source} is not an alias file (not a JSON object)")
        for alias in ALIAS_NAMES:
            if not isinstance(data.get(alias), str | None):
                raise RegistryError(f"{source}: {alias} must be a model id or null")
        history = data.get("history", [])
        if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
            raise RegistryError(f"{source}: history must be a list of moves")
        return cls(*(data.get(alias) for alias in ALIAS_NAMES), history=tuple(history))

    def since(self, alias: str) -> str | None:
        """When ``alias`` was last moved to its current model (None: never moved)."""
        for move in reversed(self.history):
            if move.get("alias") == alias:
                return move.get("at")
        return None


@dataclass(frozen=True)
class ServingModel:
    """One pushed model as scoring sees it: where it is and the ``model_id`` its outputs carry.

    ``model_id`` is the record's id (a UUID); a version pushed before the registry existed,
    whose record has none, keeps the old ``<blueprint>-<version>``. ``alias`` is the alias it
    was resolved through, if any."""

    path: str
    version: str
    model_id: str
    record: Mapping[str, Any]
    name: str = ""
    alias: str | None = None


# --------------------------------------------------------------------------- reading


def aliases_path(serving_dir: str) -> str:
    return storage.join(str(serving_dir), ALIASES)


def record_path(serving_dir: str, version: str) -> str:
    return storage.join(str(serving_dir), f"{version}{RECORD_SUFFIX}")


def read_aliases(serving_dir: str) -> Aliases:
    """The aliases of ``serving_dir`` (all null, no history, when none were written yet)."""
    return _parse(storage.read_if_exists(aliases_path(serving_dir)), aliases_path(serving_dir))


def _parse(raw: bytes | None, source: str) -> Aliases:
    if raw is None:
        return Aliases()
    try:
        return Aliases.from_dict(json.loads(raw), source)
    except ValueError as e:
        if isinstance(e, RegistryError):
            raise
        raise RegistryError(f"{source} is not readable JSON ({e})") from None


def records(serving_dir: str) -> list[dict]:
    """Every model record in ``serving_dir``, oldest version first."""
    found = []
    for path in storage.glob(storage.join(str(serving_dir), f"*{RECORD_SUFFIX}")):
        record = storage.read_json(path)
        if isinstance(record, dict):
            found.append(record)
    return sorted(found, key=lambda r: str(r.get("version") or ""))


def find_record(serving_dir: str, model_id: str) -> dict | None:
    """The record of the model with id ``model_id``, or None."""
    for record in records(serving_dir):
        if record.get("model_id") == model_id:
            return record
    return None


# --------------------------------------------------------------------------- moving aliases


def _update(serving_dir: str, change: Callable[[Aliases], Aliases]) -> Aliases:
    """Reads the aliases, applies ``change`` and writes the result if anything moved; raises
    storage.ConcurrentUpdate (and writes nothing) if another writer got in between."""
    path = aliases_path(serving_dir)
    raw = storage.read_if_exists(path)
    current = _parse(raw, path)
    updated = change(current)
    if updated != current:
        storage.replace_if_unchanged(path, raw, storage.dumps(updated.to_dict()))
    return updated


def register(
    serving_dir: str,
    record: Mapping[str, Any],
    at: str | None = None,
    replace_challenger: bool = False,
) -> Aliases:
    """Makes the pushed model of ``record`` the challenger; returns the new aliases.

    Only a blessed, pushed model with an id can be registered. It never becomes production
    here: production changes only by ``promote`` on a verdict. While another challenger is
    under test, ChallengerInTraffic is raised and nothing moves: replacing it would restart
    its experiment every time training pushes (daily, in the DAG), so no verdict would ever
    mature. ``replace_challenger=True`` replaces it anyway (a person's choice; the move says
    so). Registering the same model twice changes nothing."""
    model_id, version = record.get("model_id"), record.get("version")
    if not (record.get("blessed") and record.get("pushed") and model_id and version):
        raise RegistryError(
            f"only a blessed, pushed model with a model_id is registered; got "
            f"{record.get('name') or model_id or 'a record without model_id'} "
            f"(blessed={record.get('blessed')}, pushed={record.get('pushed')})"
        )
    name = record.get("name") or model_id
    at = at or now()

    def change(aliases: Aliases) -> Aliases:
        if model_id in (aliases.challenger, aliases.production):
            return aliases
        why = f"pushed {name} (version {version}): blessed by the offline gate"
        if aliases.challenger:
            if not replace_challenger:
                raise ChallengerInTraffic(
                    f"{name} was not made the challenger: {aliases.challenger} is still under "
                    f"test in {serving_dir} (pipelines.promote decides it first)"
                )
            why += f"; replaces challenger {aliases.challenger}, not yet decided"
        return aliases.moved(CHALLENGER, model_id, why, at)

    return _update(serving_dir, change)


def _check_challenger(serving_dir: str, aliases: Aliases, expected: str | None) -> None:
    """A move decided about one challenger must not land on another that replaced it."""
    if expected is not None and aliases.challenger != expected:
        raise storage.ConcurrentUpdate(
            f"{aliases_path(serving_dir)}: the challenger is now {aliases.challenger}, not "
            f"{expected}; nothing was moved"
        )


def promote(
    serving_dir: str, why: str, at: str | None = None, challenger: str | None = None
) -> Aliases:
    """The challenger becomes production; the old production (if any) becomes previous.

    With ``challenger``, only if that model is still the challenger (storage.ConcurrentUpdate
    otherwise): a verdict about one model never promotes a newer push."""
    at = at or now()

    def change(aliases: Aliases) -> Aliases:
        _check_challenger(serving_dir, aliases, challenger)
        if aliases.challenger is None:
            raise RegistryError(f"{aliases_path(serving_dir)} has no challenger to promote")
        winner = aliases.challenger
        if aliases.production is not None:
            aliases = aliases.moved(
                PREVIOUS, aliases.production, f"replaced in production: {why}", at
            )
        aliases = aliases.moved(PRODUCTION, winner, f"promoted: {why}", at)
        return aliases.moved(CHALLENGER, None, f"promoted to production: {why}", at)

    return _update(serving_dir, change)


def roll_back(
    serving_dir: str,
    why: str,
    alias: str = CHALLENGER,
    at: str | None = None,
    challenger: str | None = None,
) -> Aliases:
    """Takes a model out of traffic: ``alias="challenger"`` removes the challenger (production
    keeps serving everything); ``alias="production"`` puts ``previous`` back in production.
    ``challenger``: as for ``promote``."""
    at = at or now()

    def change(aliases: Aliases) -> Aliases:
        _check_challenger(serving_dir, aliases, challenger)
        if alias == CHALLENGER:
            if aliases.challenger is None:
                raise RegistryError(f"{aliases_path(serving_dir)} has no challenger to roll back")
            return aliases.moved(CHALLENGER, None, f"rolled back: {why}", at)
        if alias == PRODUCTION:
            if aliases.previous is None:
                raise RegistryError(
                    f"{aliases_path(serving_dir)} has no previous model to restore to production"
                )
            restored = aliases.previous
            aliases = aliases.moved(PRODUCTION, restored, f"rolled back: {why}", at)
            return aliases.moved(PREVIOUS, None, f"restored to production: {why}", at)
        raise RegistryError(f"can roll back {CHALLENGER} or {PRODUCTION}, not {alias!r}")

    return _update(serving_dir, change)


# --------------------------------------------------------------------------- resolving


def resolve(
    serving_dir: str, ref: str | None = None, blueprint_name: str | None = None
) -> ServingModel:
    """The model ``ref`` names in ``serving_dir``: an alias (default ``production``), a model
    id, or a version directory name. ``serving_dir`` may also be one version directory itself.

    The record (``<version>.record.json``), when present, must name ``blueprint_name``'s
    blueprint (skipped when ``blueprint_name`` is None). Raises ModelNotFound in one sentence:
    an alias pointing at nothing, an unknown id or version, a directory without a SavedModel.
    """
    serving_dir = str(serving_dir).rstrip("/")
    if storage.exists(storage.join(serving_dir, SAVED_MODEL)) and ref in (
        None,
        storage.basename(serving_dir),
    ):
        version = storage.basename(serving_dir)
        return _serving_model(
            serving_dir, version, _record_at(f"{serving_dir}{RECORD_SUFFIX}"), blueprint_name, None
        )
    if not storage.is_dir(serving_dir):
        raise ModelNotFound(f"model dir {serving_dir} does not exist")
    ref = ref or PRODUCTION
    alias = ref if ref in ALIAS_NAMES else None
    if alias:
        model_id = getattr(read_aliases(serving_dir), alias)
        if model_id is None:
            raise ModelNotFound(
                f"serving dir {serving_dir} has no {alias} model ({ALIASES}: {alias} is null; "
                "a pushed model serves once pipelines.promote promotes it, or name a version)"
            )
        ref = model_id
    version_dir = storage.join(serving_dir, ref)
    if not _ID.match(ref) and storage.is_dir(version_dir):
        return _serving_model(
            version_dir, ref, _record_at(record_path(serving_dir, ref)), blueprint_name, alias
        )
    record = find_record(serving_dir, ref)
    if record is None:
        raise ModelNotFound(f"serving dir {serving_dir} has no model or version {ref}")
    version = str(record.get("version"))
    return _serving_model(
        storage.join(serving_dir, version), version, record, blueprint_name, alias
    )


def resolve_serving_model(
    model_dir: str, blueprint_name: str | None, version: str | None = None
) -> ServingModel:
    """``resolve`` with the argument order of the scoring code's resolver it replaces
    (``--model_dir``, the blueprint, ``--model_version``, which now also takes an alias or an
    id)."""
    return resolve(model_dir, version, blueprint_name)


def _record_at(path: str) -> dict:
    try:
        record = storage.read_json(path)
    except storage.StorageError:
        return {}
    return record if isinstance(record, dict) else {}


def _serving_model(
    path: str,
    version: str,
    record: Mapping[str, Any],
    blueprint_name: str | None,
    alias: str | None,
) -> ServingModel:
    if not storage.exists(storage.join(path, SAVED_MODEL)):
        raise ModelNotFound(f"{path} is not a SavedModel (no {SAVED_MODEL})")
    recorded = (record.get("blueprint") or {}).get("name")
    if recorded and blueprint_name and recorded != blueprint_name:
        raise ModelNotFound(
            f"model {path} was trained for blueprint {recorded!r}, not {blueprint_name!r}"
        )
    name = record.get("name") or f"{blueprint_name or recorded or 'model'}-{version}"
    model_id = record.get("model_id") or name
    return ServingModel(path, version, model_id, record, name=name, alias=alias)
