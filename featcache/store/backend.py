"""The storage contract: every byte featcache reads or writes goes through a :class:`Backend`.

In the manner of zarr-python's ``abc/store.py``: one small protocol, capability flags instead of
``isinstance`` checks, and a contract test suite (``tests/test_store/test_backend_contract.py``) that
every implementation passes. Implementations: :class:`FsspecBackend` (any fsspec filesystem),
:class:`MemoryBackend` (in-process, for tests; zarr reads it too), ``store.local.LocalBackend`` (plain
OS calls) and ``store.s3.S3Backend`` (one ranged GET answers with the object's version). Paths are the
backend's own (a local path, ``bucket/key``); :class:`~featcache.store.location.Location` pairs one with
its backend and the URI the user wrote.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol, runtime_checkable

import fsspec

from featcache.retry import storage_errors


@dataclass(frozen=True)
class Stamp:
    """Which version of a file was read: its size in bytes, and its mtime (local files) or ETag (object
    stores). What the index records, so that extraction can refuse a file replaced since."""

    size: int | None
    mtime: float | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers, read by the callers that choose a strategy by it."""

    positional_reads: bool  # os.pread on an OS path: the reader keeps file descriptors, no request per read
    atomic_rename: bool  # the shard writer stages temporary siblings and renames them; else whole-object writes
    latency_bound: bool  # each request waits on a network: callers hide the wait with threads


@runtime_checkable
class Backend(Protocol):
    """The operations featcache needs from a storage system. Missing objects raise FileNotFoundError."""

    capabilities: Capabilities

    def uri(self, path: str) -> str:
        """The URL (or local path) of ``path``, as a user would write it."""

    def join(self, path: str, *parts: str) -> str:
        """The path of ``parts`` below ``path``."""

    def read(self, path: str) -> bytes:
        """The whole object."""

    def read_range(self, path: str, start: int, length: int) -> bytes:
        """``length`` bytes from byte ``start`` (fewer at the end of the object)."""

    def read_stamped(self, path: str, start: int, length: int) -> tuple[bytes, Stamp]:
        """:meth:`read_range` and the stamp of the object the bytes came from, in one request where
        the storage allows it."""

    def stamp(self, path: str) -> Stamp:
        """The object's size and version (mtime or ETag), without reading it."""

    def mtime(self, path: str) -> float | None:
        """The modification time the stamp records (local files); None, without a request, elsewhere."""

    def size(self, path: str) -> int:
        """The object's size in bytes."""

    def open(self, path: str) -> BinaryIO:
        """A seekable binary file for reading (pyarrow, PIL)."""

    def open_stamped(self, path: str, block_size: int | None = None) -> contextlib.AbstractContextManager:
        """A context manager giving (a seekable file, its stamp) with no request of its own for the stamp;
        ``block_size``: read ahead this much per request (None: exactly what is asked). A file that is
        not a regular one raises OSError(EINVAL) before it is opened."""

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write so that a reader sees the old object or the whole new one, never a part."""

    def write_if_absent(self, path: str, data: bytes) -> bool:
        """Write ``data`` unless an object is there already; True when this call wrote it."""

    def upload(self, path: str, local: str) -> None:
        """Copy the local file ``local`` to ``path``, streamed (a checkpoint of gigabytes never sits in memory),
        so that a reader sees the old object or the whole new one."""

    def download(self, path: str, local: str) -> None:
        """Copy the object at ``path`` into the local file ``local``, streamed."""

    def exists(self, path: str) -> bool:
        """Whether an object or a folder is at ``path``."""

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a folder (a prefix with objects below, on object stores)."""

    def list(self, path: str, detail: bool = False) -> list:
        """The entries directly below ``path``, listed afresh: names, or fsspec's info dicts."""

    def find(self, path: str) -> list[str]:
        """Every file below ``path``, sorted."""

    def du(self, path: str) -> int:
        """The bytes of every file below ``path``."""

    def glob(self, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
        """(sorted files whose path matches ``pattern`` (``**`` recursive), (folder, reason) of folders
        that could not be listed)."""

    def delete(self, path: str, recursive: bool = False) -> None:
        """Remove the object (the folder and everything below with ``recursive``); nothing there is no
        error (as an S3 DELETE: a second remover, or a cleanup of what was never written, succeeds)."""

    def zarr_store(self, path: str, uri: str, read_only: bool = False):
        """A zarr store rooted at ``path``."""


GLOB_CHARS = "*?["


def glob_top(pattern: str) -> tuple[str, str]:
    """(the part of ``pattern`` up to the folder above its first wildcard, with its slash; that folder)."""
    static = pattern[: min(pattern.find(c) for c in GLOB_CHARS if c in pattern)]
    prefix = static[: static.rfind("/") + 1] if "/" in static else ""
    return prefix, prefix.rstrip("/") or "/"


class FsspecBackend:
    """Any fsspec filesystem (``gs://``, ``az://``, ``file://``...); ``options`` are those it was made with."""

    capabilities = Capabilities(positional_reads=False, atomic_rename=False, latency_bound=True)

    def __init__(self, fs: fsspec.AbstractFileSystem, options: dict | None = None):
        self.fs = fs
        self.options = options or {}

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def join(self, path: str, *parts: str) -> str:
        return posixpath.join(path, *parts)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_range(self, path: str, start: int, length: int) -> bytes:
        return self.fs.cat_file(path, start=start, end=start + length)

    def read_stamped(self, path: str, start: int, length: int) -> tuple[bytes, Stamp]:
        return self.read_range(path, start, length), self.stamp(path)

    def stamp(self, path: str) -> Stamp:
        info = self.fs.info(path)
        return Stamp(info.get("size"), etag=info.get("ETag", info.get("etag")))

    def mtime(self, path: str) -> float | None:
        return None

    def size(self, path: str) -> int:
        return self.fs.size(path)

    def open(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    @contextlib.contextmanager
    def open_stamped(self, path: str, block_size: int | None = None) -> Iterator[tuple[BinaryIO, Stamp]]:
        cache = {"block_size": block_size, "cache_type": "readahead"} if block_size else {"cache_type": "none"}
        with self.fs.open(path, "rb", **cache) as f:
            details = getattr(f, "details", None) or {}
            yield f, Stamp(details.get("size", getattr(f, "size", None)),
                           etag=details.get("ETag", details.get("etag")))

    def write_atomic(self, path: str, data: bytes) -> None:
        """One PUT (a multipart upload for large objects): object stores replace whole objects."""
        with storage_errors(f"writing {self.uri(path)}"):
            self.fs.pipe_file(path, data)

    def write_if_absent(self, path: str, data: bytes) -> bool:
        """Exact only where the storage offers a conditional write; through fsspec the check and the
        write are two requests, and two writers racing both write (their contents are then expected equal)."""
        if self.fs.exists(path):
            return False
        self.write_atomic(path, data)
        return True

    def upload(self, path: str, local: str) -> None:
        """One PUT, or a multipart upload that becomes visible only when complete."""
        with storage_errors(f"writing {self.uri(path)}"):
            self.fs.put_file(local, path)

    def download(self, path: str, local: str) -> None:
        self.fs.get_file(path, local)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def list(self, path: str, detail: bool = False) -> list:
        return self.fs.ls(path, detail=detail, refresh=True)

    def find(self, path: str) -> list[str]:
        return sorted(self.fs.find(path))

    def du(self, path: str) -> int:
        return int(sum(info["size"] for info in self.fs.find(path, detail=True).values() if info.get("type") == "file"))

    def glob(self, pattern: str) -> tuple[list[str], list[tuple[str, str]]]:
        found = self.fs.glob(pattern, detail=True)
        return sorted(p for p, info in found.items() if info["type"] == "file"), []

    def delete(self, path: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            if recursive:
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)

    def zarr_store(self, path: str, uri: str, read_only: bool = False):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(uri, storage_options=self.options, read_only=read_only)


class MemoryBackend(FsspecBackend):
    """Objects in this process's memory (fsspec's ``memory://``, which zarr also opens): for tests.
    Writing if absent is exact here, and every write gives the object a new version (its ETag)."""

    capabilities = Capabilities(positional_reads=False, atomic_rename=False, latency_bound=False)
    _lock = threading.RLock()  # one per process, as the memory filesystem's objects are

    def uri(self, path: str) -> str:
        return "memory://" + path.lstrip("/")  # as users write it (fsspec's own spelling has three slashes)

    def stamp(self, path: str) -> Stamp:
        info = self.fs.info(path)
        return Stamp(info.get("size"), etag=self._version(path))

    def _version(self, path: str) -> str | None:
        """The object's creation time and identity: a rewrite makes a new object."""
        obj = self.fs.store.get(self.fs._strip_protocol(path))
        return None if obj is None else f"{obj.created.timestamp()!r}-{id(obj):x}"

    @contextlib.contextmanager
    def open_stamped(self, path: str, block_size: int | None = None) -> Iterator[tuple[BinaryIO, Stamp]]:
        stamp = self.stamp(path)
        with self.fs.open(path, "rb") as f:
            yield f, stamp

    def write_if_absent(self, path: str, data: bytes) -> bool:
        with self._lock:
            return super().write_if_absent(path, data)

    def write_atomic(self, path: str, data: bytes) -> None:
        with self._lock:  # a writer racing write_if_absent must not land between its check and its write
            super().write_atomic(path, data)
