"""``featcache inspect``: what a cache holds, as a dict (the CLI prints it or dumps it as JSON)."""

from __future__ import annotations

from featcache.store.cache import Cache, View
from featcache.store.codec import QUANTIZATION


def summarize(cache: Cache) -> dict:
    """Images, views (shapes, dtypes, bytes, committed shards), errors and statistics present."""
    errors = cache.errors()
    stages = errors.column("stage").to_pylist() if errors.num_rows else []
    attrs = cache.attrs()
    return {
        "root": cache.root.uri,
        "images": cache.num_images,
        "shard_size": attrs.get("shard_size"),
        "created_with": attrs.get("created_with"),
        "views": {key: _view_summary(view) for key, view in cache.views.items()},
        "errors": {"total": errors.num_rows, "by_stage": {s: stages.count(s) for s in sorted(set(stages))}},
    }


def _view_summary(view: View) -> dict:
    committed = view.committed_shards()
    arrays = {name: {"shape": list(view.group[name].shape), "dtype": str(view.group[name].dtype)}
              for name in ("dense", "summary", "box", "valid")}
    images_committed = sum(view.shard_range(k)[1] - view.shard_range(k)[0] for k in committed)
    return {
        "grid": list(view.spec.grid),
        "channels": view.spec.channels,
        "summary_channels": view.spec.summary_channels,
        "codec": view.spec.codec,
        "teacher": view.spec.teacher,
        "arrays": arrays,
        "bytes_stored": _bytes_under(view),
        "shards": {"committed": len(committed), "total": view.num_shards},
        "images_committed": images_committed,
        "stats": view.stats is not None,
        "quantization": view.group.attrs["featcache"].get(QUANTIZATION),
    }


def _bytes_under(view: View) -> int:
    fs, path = view.loc.fs, view.loc.path
    return int(sum(info["size"] for info in fs.find(path, detail=True).values() if info.get("type") == "file"))
