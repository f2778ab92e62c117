"""Page-cache control for cold and hot read benchmarks (local files only).

Cold = the files' pages dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``, so every read comes
from the disk, as a real epoch over a cache larger than memory reads; hot = every page read once.
Clean pages of one's own files can be dropped without root.
"""

from __future__ import annotations

import os


def _files(path: str):
    for dirpath, _, files in os.walk(path):
        for name in files:
            yield os.path.join(dirpath, name)


def evict(view) -> None:
    """Drop every file of the view (its shard objects and metadata) from the page cache."""
    for path in _files(view.loc.path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(view) -> None:
    """Read every file of the view once so that later reads come from the page cache."""
    for path in _files(view.loc.path):
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass
