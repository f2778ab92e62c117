"""Synthetic caches for store tests: a manifest of N rows and random shards with known values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from featcache.store.location import locate
from featcache.store import Cache, ViewSpec, tables
from featcache.store.codec import codec_named, codec_names


def write_manifest(root: str, n: int) -> None:
    """A manifest of ``n`` made-up images (store tests need rows, not pixels)."""
    table = pa.table({
        "index": pa.array(range(n), pa.int64()),
        "image_id": [f"img{i:05d}" for i in range(n)],
        "uri": [f"/data/img{i:05d}.jpg" for i in range(n)],
        "width": pa.array([640 + i for i in range(n)], pa.int32()),
        "height": pa.array([480] * n, pa.int32()),
    })
    tables.write_table(locate(root).join(tables.MANIFEST), table)


def spec(key: str = "dinov3@224", grid=(4, 6), channels: int = 8, tile=None, dtype="float16") -> ViewSpec:
    codec = {codec_named(c).dtype: c for c in codec_names()}[dtype]
    return ViewSpec(key=key, grid=grid, channels=channels, summary_channels=5, input_size=(64, 96), tile=tile,
                    codec=codec, teacher={"family": "test", "source": "none"})


def shard_data(view, shard: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random dense/summary/box for one shard, seeded by (seed, shard) so a test can rebuild them."""
    start, stop = view.shard_range(shard)
    rng = np.random.default_rng([seed, shard])
    n, (h, w), c = stop - start, view.spec.grid, view.spec.channels
    return {
        "dense": rng.standard_normal((n, h, w, c)).astype(view.spec.dtype),
        "summary": rng.standard_normal((n, view.spec.summary_channels)).astype("float16"),
        "box": rng.uniform(0, 500, (n, 4)).astype("float32"),
    }


def write_all(view, seed: int = 0, errors: dict[int, str] | None = None) -> None:
    """Write and commit every shard of ``view``, then rebuild ``errors.parquet`` as extract does at the end."""
    from featcache.extract.finalize import rebuild_errors

    for k in range(view.num_shards):
        start, stop = view.shard_range(k)
        errs = {i: r for i, r in (errors or {}).items() if start <= i < stop}
        view.write_shard(start, **shard_data(view, k, seed), errors=errs)
    rebuild_errors(view.cache, [view.key])


def make_cache(root: str, n: int = 10, shard_size: int = 4, **spec_kwargs) -> tuple[Cache, object]:
    """A cache with one view, nothing written yet."""
    write_manifest(root, n)
    cache = Cache.open(root)
    return cache, cache.create_view(spec(**spec_kwargs), shard_size=shard_size)
