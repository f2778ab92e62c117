"""One way to reach files: local paths and any fsspec URL (``s3://``, ``gs://``, ``memory://``…).

Credentials are never passed through featcache's own configs: s3fs reads them from the usual
AWS variables or files. ``AWS_ENDPOINT_URL`` (or ``FEATCACHE_S3_ENDPOINT``) points s3fs at a
non-AWS server such as SeaweedFS or MinIO. Nothing returned here is ever written into a cache.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import uuid
from dataclasses import dataclass

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from featcache.errors import UsageError
from featcache.retry import storage_errors

_ENDPOINT_VARS = ("FEATCACHE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_S3_SCHEMES = ("s3://", "s3a://")
#: The preflight makes one attempt with a short connect timeout: it must answer in seconds, where
#: botocore's defaults (retries with back-off, a 60 s connect timeout) would take minutes.
_PREFLIGHT_CONFIG = {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 1}}
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
_NO_BUCKET = {"NoSuchBucket", "404"}


def _s3_endpoint() -> str | None:
    """The S3 endpoint the environment names, or None for AWS itself."""
    return next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)


def storage_options(uri: str) -> dict:
    """Options fsspec needs for ``uri``: for S3, no listing cache and the endpoint from the environment.

    A chained URL (``tar://member::s3://bucket/shard.tar``, a tar member's URI in a manifest) gets them
    for its innermost layer, where fsspec expects them (keyed by that layer's protocol)."""
    if "::" in uri:
        inner = uri.rsplit("::", 1)[1]
        options = storage_options(inner)
        return {inner.split("://", 1)[0]: options} if options else {}
    if not uri.startswith(_S3_SCHEMES):
        return {}
    # Commit markers appear while a job runs: a cached listing would hide them.
    options: dict = {"use_listings_cache": False}
    endpoint = _s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def check_reachable(uri: str | os.PathLike, write: bool = False) -> None:
    """Refuse at once, in one line naming ``uri``, an object-store location that cannot be used.

    For s3:// URLs, one HEAD of the bucket proves the endpoint answers, the credentials are accepted
    and the bucket exists. With ``write``, a PUT and a DELETE of an empty probe object under ``uri``
    follow: only a write proves we may write (a read-only key passes a HEAD), and ``index`` would
    otherwise find out after reading every header. The HEAD still comes first because some servers
    (SeaweedFS) create a missing bucket on a PUT. Local paths and other URLs are left to the
    command's own checks. Raises a UsageError (exit 2); any other failure passes unchanged.
    """
    uri = os.fspath(uri)
    if not uri.startswith(_S3_SCHEMES):
        return
    options = {**storage_options(uri), "skip_instance_cache": True, "config_kwargs": _PREFLIGHT_CONFIG}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    fs.retries = 1  # s3fs's own retry loop (a class attribute), on this instance only
    with _s3_problems(uri):
        fs.call_s3("head_bucket", Bucket=path.split("/")[0])
        if write:
            probe = f"{path.rstrip('/')}/.featcache-write-check-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)


@contextlib.contextmanager
def _s3_problems(uri: str):
    """Turn the errors of an unusable S3 location into a one-line UsageError naming ``uri``."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except (OSError, BotoCoreError) as e:
        message = _s3_problem(uri, e)
        if message is None:
            raise
        raise UsageError(message) from e


def _s3_problem(uri: str, e: BaseException) -> str | None:
    """What is wrong with ``uri`` by the error ``e`` of a request to it; None when it is none of these."""
    from botocore.exceptions import ConnectionError as EndpointError, NoCredentialsError

    endpoint = _s3_endpoint() or "of AWS"
    code = _client_code(e)
    bucket = uri.split("://", 1)[1].split("/")[0]
    if isinstance(e, EndpointError):
        return f"cannot reach the S3 endpoint {endpoint} for {uri}: {_connection_reason(e)}"
    if isinstance(e, NoCredentialsError) or code in _REFUSED or (code is None and isinstance(e, PermissionError)):
        detail = "no credentials found" if isinstance(e, NoCredentialsError) else _http(code) or "access denied"
        return f"S3 credentials missing or refused for {uri} ({detail}): check AWS_ACCESS_KEY_ID/AWS_PROFILE"
    if code in _NO_BUCKET or (code is None and isinstance(e, FileNotFoundError)):
        return f"no bucket {bucket!r} at the S3 endpoint {endpoint} for {uri}: create it or fix the URL"
    return None


def _client_code(e: BaseException) -> str | None:
    """The S3 error code of the ClientError behind ``e`` (s3fs raises OSErrors from them), if any."""
    from botocore.exceptions import ClientError

    while e is not None:
        if isinstance(e, ClientError):
            return str(e.response.get("Error", {}).get("Code"))
        e = e.__cause__ or e.__context__
    return None


def _http(code: str | None) -> str | None:
    """An S3 error code as shown to the user: a HEAD's bare status ("403") as "HTTP 403"."""
    return f"HTTP {code}" if code and code.isdigit() else code


def _connection_reason(e: BaseException) -> str:
    """Why a connection failed, in a few words ("connection refused", "timed out")."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    if isinstance(e, (ConnectTimeoutError, ReadTimeoutError)):
        return "timed out"
    inner = e.kwargs.get("error", e)
    cause = getattr(inner, "os_error", inner)  # aiohttp wraps the socket's OSError
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno).lower()
    return (str(inner) or type(inner).__name__).splitlines()[0]


@dataclass(frozen=True)
class Stamp:
    """Which version of a file was read: its size in bytes, and its mtime (local files) or ETag (object
    stores). What the index records, so that extraction can refuse a file replaced since."""

    size: int | None
    mtime: float | None = None
    etag: str | None = None


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

    def read_range(self, start: int, length: int) -> tuple[bytes, Stamp]:
        """``length`` bytes from byte ``start`` (fewer at the end of the file), and the stamp of the file
        they came from, in one request where the storage allows it: one ``pread`` on a local file, one
        ranged GET on S3 (its Content-Range and ETag say which object answered). Other filesystems
        ask for the stamp separately. Raises OSError (FileNotFoundError...) as the storage does."""
        if self.is_local:
            return _pread(self.path, start, length)
        if _is_s3(self.fs) and length > 0:
            return fsspec.asyn.sync(self.fs.loop, _s3_range, self.fs, self.path, start, length)
        return self.fs.cat_file(self.path, start, start + length), self.stamp()

    def stamp(self) -> Stamp:
        """The file's size and mtime (local) or ETag, without reading it."""
        if self.is_local:
            st = os.stat(self.path)
            return Stamp(st.st_size, mtime=st.st_mtime)
        info = self.fs.info(self.path)
        return Stamp(info.get("size"), etag=info.get("ETag", info.get("etag")))

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


def _pread(path: str, start: int, length: int) -> tuple[bytes, Stamp]:
    # O_NONBLOCK: a FIFO named like a shard must not block the open (it is refused just after)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.pread(fd, max(length, 0), start), Stamp(st.st_size, mtime=st.st_mtime)
    finally:
        os.close(fd)


def _is_s3(fs) -> bool:
    return hasattr(fs, "_call_s3")  # s3fs: ranged GETs answer with the object's size and ETag


async def _s3_range(fs, path: str, start: int, length: int) -> tuple[bytes, Stamp]:
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}",
                             **extra)
    try:
        data = await resp["Body"].read()
    finally:
        resp["Body"].close()
    total = resp.get("ContentRange", "").rpartition("/")[2]
    return data, Stamp(int(total) if total.isdigit() else None, etag=resp.get("ETag"))


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
