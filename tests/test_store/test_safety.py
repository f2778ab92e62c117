"""Data-safety defects of the store found from outside (issue 10), one test each, red before the fix."""

from __future__ import annotations

import os

import numpy as np

import featcache
from featcache.extract.finalize import rebuild_errors
from tests.support.caches import make_cache, shard_data


def test_all_failed_shard_keeps_every_object_it_records(tmp_path):
    """A shard whose rows all failed is all zeros: zarr must still store (and the marker record) every object."""
    root = str(tmp_path / "cache")
    cache, view = make_cache(root, n=10, shard_size=4)
    for k in range(view.num_shards):
        start, stop = view.shard_range(k)
        errors = {i: "decode: broken" for i in range(start, stop)} if k == 1 else {}
        view.write_shard(start, **shard_data(view, k), errors=errors)
    reopened = featcache.open_cache(root).view(view.key)  # a fresh process's view, as a worker has
    start, stop = reopened.shard_range(1)
    reopened.write_shard(start, **shard_data(reopened, 1), errors={i: "decode: broken" for i in range(start, stop)})
    rebuild_errors(cache, [view.key])  # as extract does at the end of a job
    report = featcache.verify(root)
    assert report.ok, [str(p) for p in report.problems]
    commit = reopened.commit_record(1)
    for key in commit.checksums:
        assert os.path.exists(os.path.join(reopened.loc.path, *key.split("/"))), key
    assert sorted(k.split("/")[0] for k in commit.checksums) == ["box", "dense", "summary", "valid"]
    with reopened.reader() as r:
        assert not r.read(5).valid and np.all(r.read_dense(5) == 0)


def test_concurrent_view_creation_loses_no_view(cache_root):
    """8 processes create 8 different views on one root at the same moment, 20 rounds: none is lost,
    and every view can be written, committed and read back afterwards."""
    from featcache.store import Cache
    from tests.support.caches import write_manifest
    from tests.support.concurrent import create_views_concurrently

    processes, rounds = 8, 20
    roots = [f"{cache_root}/r{i}" for i in range(rounds)]
    for root in roots:
        write_manifest(root, 6)
    create_views_concurrently(roots, processes)
    expected = {f"v{k}@224" for k in range(processes)}
    for root in roots:
        cache = Cache.open(root)
        assert set(cache.views) == expected, root
        assert cache.shard_size == 4
    cache = Cache.open(roots[-1])
    for view in cache.views.values():
        view.write_shard(0, **shard_data(view, 0))
    assert featcache.verify(roots[-1]).ok
    with cache.view("v3@224").reader() as r:
        np.testing.assert_array_equal(r.read_dense(2), shard_data(cache.view("v3@224"), 0)["dense"][2])
