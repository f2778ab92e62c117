"""A view's frozen statistics as stored: arrays in one folder per version, named by their hash.

The view's attrs name the version in use (``stats``: path, arrays, hash); readers check the
arrays against that hash, so a damaged or half-published version is refused in one line.
"""

from __future__ import annotations

import hashlib

import numpy as np

from featcache.errors import CacheFormatError, UsageError
from featcache.store import attrs as attrs_json

STATS = "stats"


def stats_digest(arrays: dict[str, np.ndarray]) -> str:
    """The hash that names a view's statistics: sha256 over the arrays' names and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    return "sha256:" + digest.hexdigest()


def view_attrs(view) -> dict:
    """The view's attrs["featcache"] as stored now (not as cached when the view was opened)."""
    import zarr

    group = zarr.open_group(view.group.store, path=view.group.path, mode="r")
    return attrs_json.read(group.attrs)


def stats_path(digest: str) -> str:
    """Where the statistics with hash ``digest`` live, relative to the view: one folder per version."""
    return f"{STATS}/{digest.split(':', 1)[-1][:16]}"


def read_stats(view) -> dict[str, np.ndarray]:
    """The statistics the view's attrs name, checked against their recorded hash.

    Attrs that name arrays which are missing or differ raise a one-line ``CacheFormatError``
    (statistics are published arrays-first, so this only happens to a damaged cache).
    """
    stats = view_attrs(view).get("stats")
    if not stats:
        raise UsageError(f"{view.key} has no statistics yet: run 'featcache stats' first")
    path = stats.get("path", STATS)  # caches written before versioned statistics keep them in stats/
    try:
        arrays = read_stats_at(view, path, stats.get("arrays"))
    except (FileNotFoundError, KeyError) as e:
        raise CacheFormatError(f"{view.key}: its attrs name statistics {stats.get('hash')} under {path}, but "
                               f"{e} is missing: run 'featcache stats --recompute' (or re-extract an int8-phis view)"
                               ) from None
    if stats_digest(arrays) != stats.get("hash"):
        raise CacheFormatError(f"{view.key}: the statistics under {path} do not match their recorded hash "
                               f"{stats.get('hash')} (run 'featcache verify')")
    return arrays


def read_stats_at(view, path: str, names: list[str] | None) -> dict[str, np.ndarray]:
    """The arrays ``names`` (all when None) of the statistics folder ``path`` of ``view``."""
    import zarr

    group = zarr.open_group(view.group.store, path=f"{view.group.path}/{path}", mode="r")
    if names is None:
        return {name: arr[...] for name, arr in group.arrays()}
    return {name: group[name][...] for name in names}
