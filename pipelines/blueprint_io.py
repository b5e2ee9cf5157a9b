"""Reads a blueprint wherever a pipeline is launched from: a local path or any Beam filesystem.

On Dataflow and Vertex AI the blueprint is a ``gs://`` object, which ``loopline.blueprint``
(kept free of Beam) cannot open; every pipeline reads its ``--blueprint`` through here::

    >>> read_blueprint("examples/notify.yaml").name
    'notify'
    >>> read_blueprint("gs://my-bucket/blueprints/notify.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from loopline.blueprint import Blueprint, BlueprintError, parse_blueprint


def read_blueprint(path: str) -> Blueprint:
    """Loads and validates the blueprint at ``path`` (local, ``gs://``, any Beam filesystem).

    Raises BlueprintError naming the file when it cannot be read or is not a valid blueprint,
    exactly like ``loopline.blueprint.load_blueprint`` does for local files.
    """
    source = str(path)
    try:
        with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            text = f.read().decode("utf-8")
    except Exception as e:  # noqa: BLE001 - each filesystem has its own "cannot read" errors
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise BlueprintError(source, "<file>", f"cannot be read ({reason})") from None
    return parse_blueprint(text, source=source)
