"""Reads a blueprint wherever a pipeline is launched from: a local path or any Beam filesystem.

On Dataflow and Vertex AI the blueprint is a ``gs://`` object, which ``loopline.blueprint``
(kept free of Beam) cannot open; every pipeline reads its ``--blueprint`` through here, and
here through ``loopline.storage``::

    >>> read_blueprint("examples/notify.yaml").name
    'notify'
    >>> read_blueprint("gs://my-bucket/blueprints/notify.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

from loopline import storage
from loopline.blueprint import Blueprint, BlueprintError, parse_blueprint


def read_blueprint(path: str) -> Blueprint:
    """Loads and validates the blueprint at ``path`` (local, ``gs://``, any Beam filesystem).

    Raises BlueprintError naming the file when it cannot be read or is not a valid blueprint,
    exactly like ``loopline.blueprint.load_blueprint`` does for local files.
    """
    source = str(path)
    try:
        text = storage.read_text(source)
    except (storage.StorageError, UnicodeDecodeError) as e:
        reason = e.reason if isinstance(e, storage.StorageError) else "not UTF-8 text"
        raise BlueprintError(source, "<file>", f"cannot be read ({reason})") from None
    return parse_blueprint(text, source=source)
