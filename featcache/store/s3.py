"""S3 through s3fs: the endpoint and options from the environment, a preflight, and ranged reads that
say which version of the object answered.

Credentials are never passed through featcache's own configs: s3fs reads them from the usual AWS
variables or files. ``AWS_ENDPOINT_URL`` (or ``FEATCACHE_S3_ENDPOINT``) points s3fs at a non-AWS server
such as SeaweedFS or MinIO. Nothing returned here is ever written into a cache.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import fsspec
import fsspec.asyn

from featcache.errors import UsageError
from featcache.store.backend import FsspecBackend, Stamp

_ENDPOINT_VARS = ("FEATCACHE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
S3_SCHEMES = ("s3://", "s3a://")
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
    if not uri.startswith(S3_SCHEMES):
        return {}
    # Commit markers appear while a job runs: a cached listing would hide them.
    options: dict = {"use_listings_cache": False}
    endpoint = _s3_endpoint()
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def preflight(uri: str, write: bool = False) -> None:
    """Refuse at once, in one line naming the s3:// URL ``uri``, a location that cannot be used.

    One HEAD of the bucket proves the endpoint answers, the credentials are accepted
    and the bucket exists. With ``write``, a PUT and a DELETE of an empty probe object under ``uri``
    follow: only a write proves we may write (a read-only key passes a HEAD), and ``index`` would
    otherwise find out after reading every header. The HEAD still comes first because some servers
    (SeaweedFS) create a missing bucket on a PUT. Raises a UsageError (exit 2); any other failure passes unchanged.
    """
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


class S3Backend(FsspecBackend):
    """An S3 bucket through s3fs (chosen by the URL's protocol)."""

    def read_stamped(self, path: str, start: int, length: int) -> tuple[bytes, Stamp]:
        """One ranged GET: its Content-Range and ETag say which object answered."""
        if length <= 0:
            return super().read_stamped(path, start, length)
        return fsspec.asyn.sync(self.fs.loop, _s3_range, self.fs, path, start, length)


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
