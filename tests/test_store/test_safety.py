"""Data-safety defects of the store found from outside (issue 10), one test each, red before the fix."""

from __future__ import annotations

import os

import numpy as np

import featcache
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
    report = featcache.verify(root)
    assert report.ok, [str(p) for p in report.problems]
    commit = reopened.commit_record(1)
    for key in commit.checksums:
        assert os.path.exists(os.path.join(reopened.loc.path, *key.split("/"))), key
    assert sorted(k.split("/")[0] for k in commit.checksums) == ["box", "dense", "summary", "valid"]
    with reopened.reader() as r:
        assert not r.read(5).valid and np.all(r.read_dense(5) == 0)
