"""Reading and writing files at any path a user may give: local, ``gs://``, any Beam filesystem.

Every path that may be remote goes through here, never through ``pathlib`` or ``open``; it is
a thin layer over Beam's ``FileSystems``, which picks the filesystem by the path's scheme
(LocalFileSystem for plain paths, GCSFileSystem for ``gs://``)::

    >>> write_json("gs://b/serving/notify/aliases.json", {"production": None})
    >>> read_json("gs://b/serving/notify/aliases.json")
    {'production': None}
    >>> glob("gs://b/data/notify/*/manifest.json")
    ['gs://b/data/notify/2026-11-01/manifest.json', ...]

Object stores have no directories: ``gs://b/x/`` "exists" only as the prefix of some object, so
``is_dir`` asks whether anything lies under it rather than calling ``exists``.

Replacing a file (``write_bytes``, ``write_json``) writes a temporary name next to it and renames
it into place, so a reader sees the old content or the new, never a half-written file. Locally
that rename is one atomic ``os.rename``. On GCS Beam's rename is a copy then a delete: the copy
is one object write, itself atomic (a reader sees the old object or the whole new one), and a
crash between copy and delete leaves a stray ``.tmp-*`` object, never a torn destination.
``replace_if_unchanged`` adds a check against lost updates by concurrent writers; see its
docstring for exactly what it guarantees.

Beam is imported on first use, not at import time: ``loopline`` is the Beam-free core a product
service imports, and Beam's filesystems (with the GCP clients) take seconds to import. Reading a
local path (``join``, ``exists``, ``is_dir``, ``glob``, a plain ``open_read``) does not import it
at all, so a product service that resolves and loads a local model (``loopline.scorer``) never
does: those calls do locally what Beam's LocalFileSystem does, with its glob syntax.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import IO, Any


class StorageError(OSError):
    """A file that cannot be read or written, in one sentence naming the path; ``reason`` is
    the part after the path (what the filesystem said)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message

    def __str__(self) -> str:
        return self.args[0]


class ConcurrentUpdate(StorageError):
    """Another writer changed a file between our read and our replace."""


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _uncompressed():
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.UNCOMPRESSED


def _reason(e: Exception) -> str:
    """The underlying reason of a Beam IO error, in a few words."""
    inner = getattr(e, "exception_details", None)
    if isinstance(inner, dict) and inner:
        e = next(iter(inner.values()))
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _failed(action: str, path: str, e: Exception) -> StorageError:
    reason = _reason(e)
    return StorageError(f"cannot {action} {path} ({reason})", reason)


def is_remote(path: str) -> bool:
    """Whether ``path`` names a non-local filesystem (it has a scheme such as ``gs://``)."""
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with the separator of ``base``'s filesystem."""
    if not is_remote(base):
        return os.path.join(str(base), *parts)
    return _filesystems().join(str(base), *parts)


def basename(path: str) -> str:
    """The last component of ``path`` (``gs://b/x/y/`` and ``gs://b/x/y`` both give ``y``)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def exists(path: str) -> bool:
    """Whether a file (an object, on GCS) exists at ``path``; for a directory use ``is_dir``."""
    if not is_remote(path):
        return os.path.exists(str(path))
    try:
        return _filesystems().exists(str(path))
    except Exception as e:  # noqa: BLE001 - a bad scheme or an unreachable store
        raise _failed("check", path, e) from None


def is_dir(path: str) -> bool:
    """Whether ``path`` is a directory: locally a real one, on an object store a prefix that
    at least one object lies under."""
    path = str(path)
    if not is_remote(path):
        return os.path.isdir(path)
    return bool(glob(path.rstrip("/") + "/**", limit=1))


def glob(pattern: str, limit: int | None = None) -> list[str]:
    """The files matching ``pattern``, sorted (``*`` stops at ``/``; ``**`` crosses it).

    Directories never match, only files: to find directories, glob a file they hold (a span
    directory is the parent of its ``manifest.json``)."""
    if not is_remote(pattern):
        return sorted(_local_glob(str(pattern), limit))
    try:
        (result,) = _filesystems().match([str(pattern)], limits=[limit])
    except Exception as e:  # noqa: BLE001
        raise _failed("list", pattern, e) from None
    return sorted(m.path for m in result.metadata_list)


def _local_glob(pattern: str, limit: int | None) -> list[str]:
    # What Beam's FileSystem.match does on its LocalFileSystem: a pattern without a glob
    # character names itself; otherwise every file under the directory before the first glob
    # character (hidden ones too) whose path matches the translated pattern.
    if pattern.endswith("/"):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:
        return [pattern] if os.path.exists(pattern) else []
    matches = re.compile(_translate(pattern)).match
    found: list[str] = []
    root = os.path.dirname(prefix)
    if not os.path.exists(root):
        return found
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if matches(path) and os.path.isfile(path):
                found.append(path)
                if limit is not None and len(found) >= limit:
                    return found
    return found


def _translate(pattern: str) -> str:
    """Beam's glob syntax as a regular expression: fnmatch's, except that ``*`` stops at a
    separator and ``**`` does not."""
    out, i, n = "", 0, len(pattern)
    while i < n:
        c, i = pattern[i], i + 1
        if c == "*":
            if i < n and pattern[i] == "*":
                out, i = out + ".*", i + 1
            else:
                out += r"[^/\\]*"
        elif c == "?":
            out += "."
        elif c == "[":
            j = i + 1 if pattern[i : i + 1] == "!" else i
            j = j + 1 if pattern[j : j + 1] == "]" else j
            j = pattern.find("]", j)
            if j < 0:
                out += r"\["
                continue
            stuff, i = pattern[i:j].replace("\\", "\\\\"), j + 1
            if stuff[0] == "!":
                stuff = "^" + stuff[1:]
            elif stuff[0] == "^":
                stuff = "\\" + stuff
            out = f"{out}[{stuff}]"
        else:
            out += re.escape(c)
    return r"(?ms)" + out + r"\Z"


def size(path: str) -> int:
    """The size of the file at ``path`` in bytes."""
    try:
        (result,) = _filesystems().match([str(path)])
    except Exception as e:  # noqa: BLE001
        raise _failed("read", path, e) from None
    if not result.metadata_list:
        raise StorageError(f"cannot read {path} (no such file)", "no such file")
    return result.metadata_list[0].size_in_bytes


def open_read(path: str, compressed: bool = False) -> IO[bytes]:
    """A binary reader of ``path``; ``compressed`` decompresses by the file's extension
    (``.gz``, ``.bz2``, ...). Plain reads are the default: a ``.gz`` name must not silently
    change what ``read_bytes`` returns."""
    try:
        if not compressed and not is_remote(path):
            return open(str(path), "rb")  # noqa: SIM115 - the caller closes it
        from apache_beam.io.filesystem import CompressionTypes

        kind = CompressionTypes.AUTO if compressed else CompressionTypes.UNCOMPRESSED
        return _filesystems().open(str(path), compression_type=kind)
    except Exception as e:  # noqa: BLE001
        raise _failed("read", path, e) from None


def open_write(path: str) -> IO[bytes]:
    """A binary writer creating (or truncating) ``path``, parent directories included. Not
    atomic: a reader may see a partial file; ``write_bytes`` is the atomic way."""
    try:
        return _filesystems().create(str(path), compression_type=_uncompressed())
    except Exception as e:  # noqa: BLE001
        raise _failed("write", path, e) from None


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    """The JSON document at ``path``; StorageError naming the path when it is missing or is
    not JSON."""
    data = read_bytes(path)
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(f"{path} is not readable JSON ({e})") from None


def write_bytes(path: str, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (a temporary file renamed into place)."""
    path = str(path)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open_write(temporary) as f:
        f.write(data)
    try:
        _filesystems().rename([temporary], [path])
    except Exception as e:  # noqa: BLE001
        delete(temporary)
        raise _failed("write", path, e) from None


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps(value: Any) -> bytes:
    """The house's JSON layout for documents people read (indented, keys sorted)."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json(path: str, value: Any) -> None:
    """Replaces ``path`` with ``value`` as JSON, atomically."""
    write_bytes(path, dumps(value))


def read_if_exists(path: str) -> bytes | None:
    """The bytes at ``path``, or None when there is no file there."""
    if not exists(path):
        return None
    try:
        return read_bytes(path)
    except StorageError:
        if not exists(path):  # deleted between the two calls
            return None
        raise


def replace_if_unchanged(path: str, expected: bytes | None, data: bytes) -> None:
    """Replaces ``path`` with ``data`` only if it still holds ``expected`` (None: no file).

    For read-modify-write of a small shared document (the registry's ``aliases.json``): the
    caller reads, computes, and passes what it read as ``expected``. The file is read again
    just before the atomic replace; if another writer changed it meanwhile, ConcurrentUpdate is
    raised and nothing is written, so the caller can re-read and retry or stop.

    What is guaranteed: an update another writer finished before our re-read is never
    overwritten (no lost update in the common, non-overlapping case), and a reader never sees
    a torn file. What is not: two writers whose re-read and rename interleave within the same
    instant can both succeed, the later one winning. Closing that window needs a conditional
    write (GCS's ``ifGenerationMatch`` precondition), which Beam's FileSystems does not expose;
    the registry's writers (a daily DAG task, a person rolling back by hand) are rare enough
    that the check catches the realistic race: a manual move while the DAG's promote runs.
    """
    current = read_if_exists(path)
    if current != expected:
        raise ConcurrentUpdate(
            f"{path} was changed by another writer since it was read; nothing was written "
            "(read it again and retry)"
        )
    write_bytes(path, data)


def delete(path: str) -> None:
    """Deletes the file (or, locally, the directory tree) at ``path``; a missing path is not
    an error."""
    try:
        if exists(path):
            _filesystems().delete([str(path)])
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _failed("delete", path, e) from None
