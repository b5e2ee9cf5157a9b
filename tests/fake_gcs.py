"""An in-process fake of GCS at Beam's filesystem boundary, for tests of ``gs://`` paths.

``FakeGcsFileSystem`` is a Beam ``FileSystem`` that, once ``activate``d for a test, owns the ``gs`` scheme: ``FileSystems.open("gs://bucket/a/b")`` reads the file
``ROOT/bucket/a/b`` of a local directory. It keeps what matters of GCS's semantics for code
under test: there are only objects (no directories: ``exists`` is false for a prefix, listing a
prefix lists every object under it, ``mkdirs`` does nothing) and rename is a copy then a delete.
It goes through the same ``FileSystems`` lookup that picks the real GCSFileSystem on Dataflow;
the real one is set aside while the fake is active (Beam refuses two filesystems for one
scheme). Only the process that set it up sees it, so tests that use it run in-process.

A fake, not an emulator: nothing local speaks GCS's API without a server. The GCS emulator
(tests/gcs_emulator.py) tests the real client; this one, the tests' only fake object store,
tests our paths, listing and object-store semantics in-process: storage, the registry, span
discovery, the blueprint read, promote, model records, and the join rewriting a span atomically
(tests/test_span_atomic.py).

    def test_x(tmp_path, monkeypatch):
        activate(monkeypatch, tmp_path)         # gs://b/x.json is now tmp_path/b/x.json
        (tmp_path / "b" / "x.json").write_text("{}")
        assert storage.exists("gs://b/x.json")

``root_for`` gives a test module a fixture that runs each test on a local directory and on a
fake bucket.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from apache_beam.io.filesystem import (
    CompressedFile,
    CompressionTypes,
    FileMetadata,
    FileSystem,
)
from apache_beam.io.gcp.gcsfilesystem import GCSFileSystem

SCHEME = "gs"
PREFIX = "gs://"
_INACTIVE = "loopline-fake-gs-inactive"


class FakeGcsFileSystem(FileSystem):
    """``gs://BUCKET/NAME`` is the file ``root/BUCKET/NAME``; see the module docstring."""

    root: Path | None = None
    _scheme = _INACTIVE

    @classmethod
    def scheme(cls):
        return cls._scheme

    def _local(self, path: str) -> Path:
        if not path.startswith(PREFIX) or type(self).root is None:
            raise ValueError(f"{path!r} is not a gs:// path of the active fake")
        return type(self).root / path[len(PREFIX) :]

    def _gs(self, local: Path) -> str:
        return PREFIX + local.relative_to(type(self).root).as_posix()

    # Paths: the same rules as GCSFileSystem.
    def join(self, basepath, *paths):
        path = basepath
        for p in paths:
            path = path.rstrip("/") + "/" + p.lstrip("/")
        return path

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass  # no directories on an object store

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        base = self._local(dir_or_prefix)
        root = base if base.is_dir() else base.parent
        if not root.exists():
            return
        for dirpath, _, files in os.walk(root):
            for name in files:
                local = Path(dirpath) / name
                path = self._gs(local)
                if path.startswith(dir_or_prefix):
                    stat = local.stat()
                    yield FileMetadata(path, stat.st_size, stat.st_mtime)

    def _open(self, path, mode, compression_type):
        local = self._local(path)
        if "w" in mode:
            local.parent.mkdir(parents=True, exist_ok=True)
        raw = open(local, mode)  # noqa: SIM115 - returned to the caller, who closes it
        kind = FileSystem._get_compression_type(path, compression_type)
        if kind == CompressionTypes.UNCOMPRESSED:
            return raw
        return CompressedFile(raw, compression_type=kind)

    def create(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return self._open(path, "wb", compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        if not self._local(path).is_file():
            raise FileNotFoundError(f"No such object: {path}")
        return self._open(path, "rb", compression_type)

    def copy(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            target = self._local(destination)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._local(source), target)

    def rename(self, source_file_names, destination_file_names):
        # GCS has no rename: copy, then delete the source (as GCSFileSystem does).
        self.copy(source_file_names, destination_file_names)
        self.delete(source_file_names)

    def exists(self, path):
        return self._local(path).is_file()

    def size(self, path):
        return self._local(path).stat().st_size

    def last_updated(self, path):
        return self._local(path).stat().st_mtime

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        local = self._local(path)
        return FileMetadata(path, local.stat().st_size, local.stat().st_mtime)

    def delete(self, paths):
        for path in paths:
            if path.endswith("/"):  # a prefix: every object under it
                for meta in list(self._list(path)):
                    self._local(meta.path).unlink()
            else:
                self._local(path).unlink()


def activate(monkeypatch, root: Path) -> Path:
    """Makes ``gs://`` paths resolve to files under ``root`` until ``monkeypatch`` is undone
    (the end of the test); returns ``root``. A test module's fixture calls it::

        @pytest.fixture
        def fake_gcs(tmp_path, monkeypatch):
            return activate(monkeypatch, tmp_path)
    """
    monkeypatch.setattr(GCSFileSystem, "scheme", classmethod(lambda cls: "gs-set-aside"))
    monkeypatch.setattr(FakeGcsFileSystem, "_scheme", SCHEME)
    monkeypatch.setattr(FakeGcsFileSystem, "root", root)
    return root


def upload(local: Path, bucket_root: Path, name: str) -> str:
    """Copies a local file or tree into the fake bucket as ``gs://NAME``; returns that URI."""
    target = bucket_root / name
    if local.is_dir():
        shutil.copytree(local, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
    return PREFIX + name


class Root:
    """A place to put test files, named two ways: ``uri`` for the code under test (a local
    path, or ``gs://bucket``) and ``local``, the directory behind it, for the test's setup."""

    def __init__(self, uri: str, local: Path):
        self.uri, self.local = uri, local

    def __repr__(self):
        return self.uri

    def __truediv__(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def root_for(kind: str, tmp_path: Path, monkeypatch) -> Root:
    """A Root on the local disk (``kind`` "local") or on a bucket of the fake ("gs"), for a
    fixture that runs each test on both::

        @pytest.fixture(params=["local", "gs"])
        def storage_root(request, tmp_path, monkeypatch):
            return root_for(request.param, tmp_path, monkeypatch)
    """
    if kind == "local":
        return Root(str(tmp_path), tmp_path)
    bucket = activate(monkeypatch, tmp_path / "fake-gcs") / "bucket"
    bucket.mkdir(parents=True)
    return Root("gs://bucket", bucket)
