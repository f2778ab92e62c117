"""The cache format (DESIGN.md §2): views in Zarr v3, Parquet tables, commit markers.

``Cache``, ``View``, ``Commit`` and ``ViewSpec`` load on first use, so that the codecs
(``featcache.store.codec``) import where zarr is not installed (a lent GPU machine's benchmarks).
"""

from __future__ import annotations

import importlib

_NAMES = {"Cache": "featcache.store.cache", "View": "featcache.store.cache", "Commit": "featcache.store.commits",
          "FORMAT_VERSION": "featcache.store.spec", "ViewSpec": "featcache.store.spec"}

__all__ = ["Cache", "Commit", "FORMAT_VERSION", "View", "ViewSpec"]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'featcache.store' has no attribute {name!r}")
