"""One way to reach files: local paths and any fsspec URL (``s3://``, ``gs://``, ``memory://``…).

Credentials are never passed through featcache's own configs: s3fs reads them from the usual
AWS variables or files. ``AWS_ENDPOINT_URL`` (or ``FEATCACHE_S3_ENDPOINT``) points s3fs at a
non-AWS server such as SeaweedFS or MinIO. Nothing returned here is ever written into a cache.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from featcache.retry import storage_errors

_ENDPOINT_VARS = ("FEATCACHE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def storage_options(uri: str) -> dict:
    """Options fsspec needs for ``uri``: for S3, no listing cache and the endpoint from the environment."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    # Commit markers appear while a job runs: a cached listing would hide them.
    options: dict = {"use_listings_cache": False}
    endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; ``uri`` is how the user wrote it (without credentials)."""

    fs: fsspec.AbstractFileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        """True when plain OS calls (open, os.pread) reach the path."""
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        """The location of ``parts`` below this one."""
        if self.is_local:
            path = os.path.join(self.path, *parts)
            return Location(self.fs, path, path)
        return Location(self.fs, posixpath.join(self.path, *parts), "/".join([self.uri, *parts]))

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write so that a reader sees the old object or the whole new one, never a part.

        Object stores replace whole objects on PUT; on a filesystem we write a temporary
        sibling and rename it over the target, and remove it when the write fails. Storage that
        refuses the write for good (full, read-only, not permitted) raises a StorageError.
        """
        with storage_errors(f"writing {self.uri}"):
            if not self.is_local:
                self.fs.pipe_file(self.path, data)
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            _write_then_rename(self.path, data)


    def write_bytes_if_absent(self, data: bytes) -> bool:
        """Write ``data`` unless something is there already; True when this call wrote it.

        On a local disk this is exact (a hard link of a complete temporary file fails if the target
        exists). Object stores give no such primitive through fsspec: there the check and the write
        are two requests, and two writers racing both write (their contents are then expected equal).
        """
        if self.exists():
            return False
        with storage_errors(f"writing {self.uri}"):
            if not self.is_local:
                self.fs.pipe_file(self.path, data)
                return True
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                _write_then_rename(self.path, data, os.link)
                return True
            except FileExistsError:
                return False


def _write_then_rename(path: str, data: bytes, publish=os.replace) -> None:
    """Write a complete temporary sibling, then ``publish`` it at ``path`` (rename over, or link);
    the temporary file never outlives the call."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed away, or never created
            os.unlink(tmp)


def locate(uri: str | os.PathLike) -> Location:
    """Resolve a local path or fsspec URL to a :class:`Location`."""
    uri = os.fspath(uri)
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(LocalFileSystem(), path, path)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    if isinstance(fs, LocalFileSystem):
        return Location(fs, os.path.abspath(path), uri)
    return Location(fs, path.rstrip("/"), uri.rstrip("/"))
