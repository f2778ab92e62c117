"""``featcache inspect``: what a cache holds, as a dict (the CLI prints it or dumps it as JSON)."""

from __future__ import annotations

from featcache.store.cache import Cache, View
from featcache.store.codec import QUANTIZATION
from featcache.store.spec import FORMAT_VERSION

#: The statistics summary keys ``inspect`` shows (DESIGN.md §7); the attrs hold more (hash, arrays, ...).
STATS_KEYS = ("alpha", "dispersion", "tokens")


def summarize(cache: Cache) -> dict:
    """Images, views (shapes, dtypes, bytes, committed shards), errors and statistics present.

    The keys of DESIGN.md §7 (``format``, ``num_images``, ``shard_size``; per view ``grid``, ``channels``,
    ``codec``, ``shards_committed``, ``shards_total``, ``bytes``, ``stats``) sit beside the older ones.
    """
    errors = cache.errors
    stages = errors.column("stage").to_pylist()
    attrs = cache.attrs()
    return {
        "root": cache.root.uri,
        "format": format_version(cache),
        "images": cache.num_images,
        "num_images": cache.num_images,
        "shard_size": attrs.get("shard_size"),
        "created_with": attrs.get("created_with"),
        "views": {key: _view_summary(view) for key, view in _views(cache).items()},
        "not_views": cache.non_views(),
        "errors": {"total": errors.num_rows, "by_stage": {s: stages.count(s) for s in sorted(set(stages))}},
    }


def _views(cache: Cache) -> dict[str, View]:
    """The cache's views; a damaged one raises (one line), folders that are not views are listed apart."""
    views, broken = cache.scan_views()
    if broken:
        cache.views  # noqa: B018 - raises the one line naming the damaged view
    return views


def format_version(cache: Cache) -> int:
    """The cache format version its root attrs record; before the first view only the manifest exists,
    written by this code, so it is the current version."""
    return cache.attrs().get("format", FORMAT_VERSION)


def _view_summary(view: View) -> dict:
    committed = view.committed_shards()
    images_committed = sum(view.shard_range(k)[1] - view.shard_range(k)[0] for k in committed)
    stored = _bytes_under(view)
    return {
        "grid": list(view.spec.grid),
        "channels": view.spec.channels,
        "summary_channels": view.spec.summary_channels,
        "codec": view.spec.codec,
        "token_bytes": view.spec.codec_type.token_bytes(view.spec.channels),  # one patch token in the dense array
        "teacher": view.spec.teacher,
        "arrays": _arrays(view),
        "bytes": stored,
        "bytes_stored": stored,
        "shards": {"committed": len(committed), "total": view.num_shards},
        "shards_committed": len(committed),
        "shards_total": view.num_shards,
        "images_committed": images_committed,
        "stats": _stats_summary(view),
        "quantization": view.attrs.get(QUANTIZATION),
    }


def _arrays(view: View) -> dict:
    return {name: {"shape": list(array.shape), "dtype": str(array.dtype)} for name, array in view.arrays.items()}


def _stats_summary(view: View) -> dict | None:
    """``{alpha, dispersion, tokens}`` of the view's published statistics, None before ``featcache stats``."""
    stats = view.stats
    return None if stats is None else {k: stats.get(k) for k in STATS_KEYS}


def _bytes_under(view: View) -> int:
    return view.loc.backend.du(view.loc.path)
