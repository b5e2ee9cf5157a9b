"""An in-process object store behind Beam's ``FileSystems``, shaped like GCS, for tests.

``fake-gcs://bucket/a/b`` is an object named ``bucket/a/b`` in a dict: no directories (``mkdirs``
does nothing, a "directory" is a name prefix), rename is copy then delete, and listing is by
prefix, as on GCS. Code that works here does not rely on local-disk behaviour. Defining the
class registers it: Beam finds filesystems by subclass and scheme.
"""

from __future__ import annotations

import io
import time

from apache_beam.io.filesystem import (
    BeamIOError,
    CompressedFile,
    CompressionTypes,
    FileMetadata,
    FileSystem,
)

SCHEME = "fake-gcs"
PREFIX = f"{SCHEME}://"


class _Upload(io.BytesIO):
    """A new object, visible whole once closed (like a finished GCS upload)."""

    mode = "wb"  # what Beam's CompressedFile asks a handle to tell reading from writing

    def __init__(self, store: dict, path: str):
        super().__init__()
        self._store, self._path = store, path

    def close(self) -> None:
        if not self.closed:
            self._store[self._path] = self.getvalue()
        super().close()


class _Download(io.BytesIO):
    mode = "rb"


class FakeObjectStore(FileSystem):
    """Beam FileSystem over ``objects`` (path -> bytes), shared by every instance."""

    objects: dict[str, bytes] = {}

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path: str) -> tuple[str, str]:
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path: str) -> None:
        pass  # no directories in an object store

    def has_dirs(self) -> bool:
        return False

    def _list(self, prefix: str):
        for path, data in sorted(self.objects.items()):
            if path.startswith(prefix):
                yield FileMetadata(path, len(data), time.time())

    def _wrap(self, handle, path: str, compression_type: str):
        if compression_type == CompressionTypes.AUTO:
            compression_type = CompressionTypes.detect_compression_type(path)
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return handle
        return CompressedFile(handle, compression_type=compression_type)

    def create(self, path, mime_type="application/octet-stream", compression_type="auto"):
        return self._wrap(_Upload(self.objects, path), path, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        if path not in self.objects:
            raise BeamIOError("Open failed", {path: FileNotFoundError(path)})
        return self._wrap(_Download(self.objects[path]), path, compression_type)

    def copy(self, source_file_names, destination_file_names) -> None:
        errors = {}
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            if source not in self.objects:
                errors[(source, destination)] = FileNotFoundError(source)
            else:
                self.objects[destination] = self.objects[source]
        if errors:
            raise BeamIOError("Copy operation failed", errors)

    def rename(self, source_file_names, destination_file_names) -> None:
        self.copy(source_file_names, destination_file_names)
        for source in source_file_names:
            self.objects.pop(source, None)

    def exists(self, path: str) -> bool:
        return path in self.objects

    def size(self, path: str) -> int:
        return len(self.objects[path])

    def last_updated(self, path: str) -> float:
        return time.time()

    def checksum(self, path: str) -> str:
        return str(hash(self.objects[path]))

    def metadata(self, path: str) -> FileMetadata:
        return FileMetadata(path, len(self.objects[path]), time.time())

    def delete(self, paths) -> None:
        errors = {}
        for path in paths:
            if path.endswith("/"):
                for name in [p for p in self.objects if p.startswith(path)]:
                    del self.objects[name]
            elif self.objects.pop(path, None) is None:
                errors[path] = FileNotFoundError(path)
        if errors:
            raise BeamIOError("Delete operation failed", errors)
