"""Reading blueprints in the Airflow environment, with plain YAML (no Loopline import).

The scheduler only needs a blueprint's name, version, file name, label timing (how long to
wait before a day's labels are mature) and whether it pseudonymises (the jobs then get the key's
secret); the pipelines validate the whole blueprint themselves.

    >>> info = read_blueprint("examples/notify.yaml")
    >>> info.name, info.label_window
    ('notify', datetime.timedelta(seconds=3600))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import yaml

# Where blueprints are looked for, first existing wins: $LOOPLINE_BLUEPRINTS_DIR, then
# `blueprints/` beside the DAG file (the Composer layout: gs://<composer bucket>/dags/blueprints),
# then the repository's examples/ (a checkout used as the DAG folder).
BLUEPRINTS_ENV = "LOOPLINE_BLUEPRINTS_DIR"
BLUEPRINT_SUFFIXES = (".yaml", ".yml")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BlueprintFileError(ValueError):
    """A blueprint file the DAG factory cannot schedule, naming the file and the field."""


@dataclass(frozen=True)
class BlueprintInfo:
    """What scheduling needs from one blueprint file."""

    name: str
    version: str
    path: Path
    label_window: timedelta
    backward_slack: timedelta
    # Whether privacy.pseudonymise lists identifiers: the jobs then need the key's secret.
    pseudonymises: bool = False

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def slug(self) -> str:
        """The name as Dataflow and Vertex AI job ids allow it: lowercase letters, digits, '-'."""
        return self.name.lower().replace("_", "-")


def parse_duration(value: object) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d``, ``250ms`` or a bare number of seconds, as loopline does."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '2d', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return timedelta(seconds=value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected a duration like '90s', '15m', '1h' or '2d', got {value!r}")
    amount, unit = match.groups()
    return timedelta(seconds=float(amount) * _UNIT_SECONDS[unit])


def read_blueprint(path: str | Path) -> BlueprintInfo:
    """Reads the fields scheduling needs; BlueprintFileError names what is missing."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BlueprintFileError(f"{path}: cannot be read as YAML ({e})") from None
    if not isinstance(data, dict):
        raise BlueprintFileError(f"{path}: must be a mapping of blueprint fields")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BlueprintFileError(f"{path}: name: must be an identifier, got {name!r}")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int | str) or not str(version).strip():
        raise BlueprintFileError(f"{path}: version: is required")
    label = data.get("label")
    if not isinstance(label, dict) or "window" not in label:
        raise BlueprintFileError(f"{path}: label.window: is required")
    try:
        window = parse_duration(label["window"])
        slack = parse_duration(label.get("backward_slack", 0))
    except ValueError as e:
        raise BlueprintFileError(f"{path}: label: {e}") from None
    privacy = data.get("privacy") or {}
    if not isinstance(privacy, dict):
        raise BlueprintFileError(f"{path}: privacy: must be a mapping")
    pseudonymises = bool(privacy.get("pseudonymise"))
    return BlueprintInfo(name, str(version), path, window, slack, pseudonymises)


def blueprint_dir(dag_folder: str | Path) -> Path:
    """The directory the DAG factory reads blueprints from (see BLUEPRINTS_ENV above)."""
    configured = os.environ.get(BLUEPRINTS_ENV)
    if configured:
        return Path(configured)
    beside = Path(dag_folder) / "blueprints"
    if beside.is_dir():
        return beside
    return Path(dag_folder).resolve().parent / "examples"


def find_blueprints(directory: str | Path) -> list[BlueprintInfo]:
    """Every blueprint file in a directory, sorted by name; two files with one name refuse."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: dict[str, BlueprintInfo] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in BLUEPRINT_SUFFIXES or not path.is_file():
            continue
        info = read_blueprint(path)
        if info.name in found:
            raise BlueprintFileError(
                f"{path}: blueprint {info.name!r} is also defined by {found[info.name].path}"
            )
        found[info.name] = info
    return [found[name] for name in sorted(found)]
