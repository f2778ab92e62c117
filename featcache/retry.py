"""Which failures are worth retrying (DESIGN.md §2: only transient ones).

Transient: a lost or refused connection, a timeout, a busy or briefly failing server (s3fs turns
HTTP 503/SlowDown into EBUSY and 500 into EREMOTEIO), a dead worker (the scheduler sees that one
itself). Not transient, and never retried: storage that refuses the write for good (full,
over quota, read-only, not permitted: a :class:`StorageError`), a featcache error, and anything
unexpected (a bug repeats itself; its traceback goes into the job's run record).
"""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager

from featcache.errors import FeatcacheError, StorageError

#: errno -> (what happened, what the user can do)
_STORAGE = {
    errno.ENOSPC: ("no space left on device", "free space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and rerun"),
    errno.EROFS: ("read-only file system", "write to a writable location, or remount it read-write"),
    errno.EACCES: ("permission denied", "give this user write access, or write elsewhere"),
    errno.EPERM: ("operation not permitted", "give this user write access, or write elsewhere"),
    errno.ENOTDIR: ("a file stands where a folder is needed", "move that file away and rerun"),
    errno.EEXIST: ("a file stands where a folder is needed", "move that file away and rerun"),
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EREMOTEIO}


def storage_error(e: BaseException, doing: str) -> StorageError | None:
    """``e`` as a one-line :class:`StorageError` ("<what happened> <doing>: <what to do>") when it is
    storage refusing a write for good; None for any other error. A StorageError is returned as it is."""
    if isinstance(e, StorageError):
        return e
    if not isinstance(e, OSError):
        return None
    code = errno.EACCES if isinstance(e, PermissionError) and e.errno is None else e.errno  # S3 AccessDenied
    if code not in _STORAGE:
        return None
    what, advice = _STORAGE[code]
    return StorageError(f"{what} {doing}: {advice}", code)


@contextmanager
def storage_errors(doing: str):
    """Turn an OSError that retrying cannot fix into a :class:`StorageError` saying what was being
    written (``doing``: "writing /x/y.json"); every other error passes unchanged."""
    try:
        yield
    except OSError as e:
        error = storage_error(e, doing)
        if error is None or error is e:
            raise
        raise error from e


def is_transient(e: BaseException) -> bool:
    """True when trying the same work again may succeed (a connection, a timeout, a busy server)."""
    if isinstance(e, FeatcacheError) or storage_error(e, "") is not None:
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return isinstance(e, _client_connection_errors())


def _client_connection_errors() -> tuple[type, ...]:
    """The connection errors of the S3 clients under s3fs (botocore, aiohttp), when loaded: an
    exception of theirs cannot exist in a process that has not imported them."""
    found: list[type] = []
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None:
        found += [boto.ConnectionError, boto.HTTPClientError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(found)


def describe(e: BaseException) -> str:
    """One line for a log or an error message: the exception's type and the first line of its text."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
