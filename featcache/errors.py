"""featcache's error hierarchy.

Every class also subclasses the builtin it resembles (as zarr-python does with
``NodeNotFoundError(..., FileNotFoundError)``), so callers can catch either. The CLI turns a
``FeatcacheError`` into a one-line message and an exit code; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class UsageError(FeatcacheError, ValueError):
    """An argument or config value that cannot be used (bad path, bad key, bad shape)."""


class SourceNotFoundError(FeatcacheError, FileNotFoundError):
    """An image source, cache root or view that does not exist."""


class CacheFormatError(FeatcacheError, ValueError):
    """A cache whose stored metadata is missing, of another format version, or inconsistent."""


class MisalignedWriteError(FeatcacheError, ValueError):
    """A write that does not cover exactly one whole shard (it would be a read-modify-write)."""


class ImageError(FeatcacheError, ValueError):
    """One image that cannot be used; carries the reason recorded in the errors table."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class TeacherLoadError(FeatcacheError, OSError):
    """A teacher whose weights or config cannot be loaded as asked (missing, wrong model, corrupt)."""


class ChecksumError(CacheFormatError):
    """Stored bytes whose crc32c does not match: a damaged object (a flipped bit, a torn write)."""

    exit_code = 1  # the command ran and found a damaged cache (README: exit codes)


class StorageError(FeatcacheError, OSError):
    """A write the storage refuses for good (full, read-only, not permitted): retrying cannot help.

    ``errno`` is the original one (ENOSPC, EROFS, EACCES...); the message names the path and what to do.
    """

    exit_code = 1

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):  # keeps errno across processes (OSError would rebuild it from args alone)
        return type(self), (str(self), self.errno)


class ShardFailedError(FeatcacheError, RuntimeError):
    """An error inside a shard that stopped the job (not retried): a featcache error, or an unexpected
    one whose traceback is in the run record. ``__cause__`` is the original exception."""

    exit_code = 1
