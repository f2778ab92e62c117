"""Many processes racing on one cache root: each creates its own view on every root, in lock-step."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

_barrier = None


def _init(barrier) -> None:
    global _barrier
    _barrier = barrier


def _create_on_each(roots: list[str], k: int) -> int:
    from tests.support.caches import spec
    from featcache.store import Cache

    for root in roots:
        _barrier.wait(timeout=60)  # every process starts its creation at the same moment
        Cache.open(root).create_view(spec(key=f"v{k}@224"), shard_size=4)
    return k


def create_views_concurrently(roots: list[str], processes: int) -> None:
    """``processes`` spawned processes each create view ``v<k>@224`` on every root, all at once per root."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init, initargs=(barrier,)) as pool:
        done = list(pool.map(_create_on_each, [roots] * processes, range(processes)))
    assert sorted(done) == list(range(processes))
