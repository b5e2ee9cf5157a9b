"""Which pushed model to score with: a serving dir's versions, their records, the model id.

>>> resolve_serving_model("serving/notify", "notify").model_id
'notify-1793534400'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
