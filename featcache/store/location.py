"""Where a file is: a :class:`Location` pairs a path with its :class:`~featcache.store.backend.Backend`.

``locate`` is the one place that turns what a user wrote (a local path, an fsspec URL) into a backend;
every caller above ``store/`` holds Locations and never learns which backend is behind one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from featcache.store import s3
from featcache.store.backend import Backend, FsspecBackend, MemoryBackend, Stamp
from featcache.store.local import LocalBackend

__all__ = ["Location", "Stamp", "check_reachable", "locate"]


@dataclass(frozen=True)
class Location:
    """A backend and a path on it; ``uri`` is how the user wrote it (without credentials)."""

    backend: Backend
    path: str
    uri: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem underneath, for tests and tools; library code uses the backend's methods."""
        return self.backend.fs

    def join(self, *parts: str) -> "Location":
        """The location of ``parts`` below this one."""
        path = self.backend.join(self.path, *parts)
        # local files are named by their path (a file:// URL too); URLs keep the user's spelling (s3a://)
        uri = path if self.backend.uri(self.path) == self.path else "/".join([self.uri, *parts])
        return Location(self.backend, path, uri)

    def at(self, path: str) -> "Location":
        """Another path on the same backend (a listed file), named by its own URL."""
        return Location(self.backend, path, self.backend.uri(path))

    def exists(self) -> bool:
        return self.backend.exists(self.path)

    def isdir(self) -> bool:
        return self.backend.isdir(self.path)

    def read_bytes(self) -> bytes:
        return self.backend.read(self.path)

    def read_range(self, start: int, length: int) -> tuple[bytes, Stamp]:
        """``length`` bytes from byte ``start`` (fewer at the end of the file), and the stamp of the file
        they came from, in one request where the storage allows it (:meth:`Backend.read_stamped`)."""
        return self.backend.read_stamped(self.path, start, length)

    def stamp(self) -> Stamp:
        """The file's size and mtime (local) or ETag, without reading it."""
        return self.backend.stamp(self.path)

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write so that a reader sees the old object or the whole new one, never a part. Storage that
        refuses the write for good (full, read-only, not permitted) raises a StorageError."""
        self.backend.write_atomic(self.path, data)

    def write_bytes_if_absent(self, data: bytes) -> bool:
        """Write ``data`` unless something is there already; True when this call wrote it."""
        return self.backend.write_if_absent(self.path, data)

    def upload(self, local: str | os.PathLike) -> None:
        """Copy the local file ``local`` here, streamed; a reader sees the old object or the whole new one."""
        self.backend.upload(self.path, os.fspath(local))

    def download(self, local: str | os.PathLike) -> None:
        """Copy this file into the local file ``local``, streamed."""
        self.backend.download(self.path, os.fspath(local))

    def delete(self, recursive: bool = False) -> None:
        self.backend.delete(self.path, recursive)


def locate(uri: str | os.PathLike) -> Location:
    """Resolve a local path or fsspec URL to a :class:`Location` on the backend its protocol names."""
    uri = os.fspath(uri)
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(LocalBackend(), path, path)
    options = s3.storage_options(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if isinstance(fs, LocalFileSystem):
        return Location(LocalBackend(), os.path.abspath(path), uri)
    return Location(_backend(uri, fs, options), path.rstrip("/"), uri.rstrip("/"))


def _backend(uri: str, fs: fsspec.AbstractFileSystem, options: dict) -> Backend:
    """The backend for a filesystem fsspec opened for ``uri``: S3 and memory by the protocol."""
    if uri.startswith(s3.S3_SCHEMES) and "::" not in uri:
        return s3.S3Backend(fs, options)
    if isinstance(fs, MemoryFileSystem):
        return MemoryBackend(fs, options)
    return FsspecBackend(fs, options)


def check_reachable(uri: str | os.PathLike, write: bool = False) -> None:
    """Refuse at once, in one line naming ``uri``, an object-store location that cannot be used
    (:func:`featcache.store.s3.preflight`); local paths and other URLs are left to the command's own
    checks. Raises a UsageError (exit 2); any other failure passes unchanged."""
    uri = os.fspath(uri)
    if uri.startswith(s3.S3_SCHEMES):
        s3.preflight(uri, write)
