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
