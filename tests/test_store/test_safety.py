"""Data-safety defects of the store found from outside (issue 10), one test each, red before the fix."""

from __future__ import annotations

import os

import numpy as np
import pytest

import featcache
from featcache.extract.finalize import rebuild_errors
from featcache.store import attrs as attrs_json
from tests.support.caches import make_cache, shard_data, write_all


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
    """8 processes create 8 different views on one root at the same moment, 20 rounds (8 on S3, where a
    round costs ~1.3 s of client CPU on 2 cores): none is lost, and every view can be written,
    committed and read back afterwards."""
    from featcache.store import Cache
    from tests.support.caches import write_manifest
    from tests.support.concurrent import create_views_concurrently

    processes, rounds = 8, 8 if cache_root.startswith("s3://") else 20
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


def test_a_cache_from_before_fingerprints_gets_one_on_its_next_write(tmp_path):
    """Caches written by earlier featcache versions (a shared views list, no fingerprint, stats in stats/)
    still open in their old order, and the driver's next view creation records the fingerprint."""
    import json
    import shutil

    from featcache.store import Cache, tables
    from tests.support.caches import spec, write_manifest

    root = str(tmp_path / "cache")
    write_manifest(root, 6)
    cache = Cache.open(root)
    for key in ("b@224", "a@224"):
        cache.create_view(spec(key=key), shard_size=4)
    meta_path = tmp_path / "cache" / "features.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())  # as caches were written then: the attrs an object, not a string
    meta["attributes"]["featcache"] = attrs_json.read(meta["attributes"])
    del meta["attributes"]["featcache"]["manifest"]
    meta["attributes"]["featcache"]["views"] = ["b@224", "a@224"]
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "cache" / "features.zarr" / "_manifest")
    for key in ("a@224", "b@224"):  # same creation time: only the legacy list can order them
        path = tmp_path / "cache" / "features.zarr" / key / "zarr.json"
        view_meta = json.loads(path.read_text())
        view_meta["attributes"]["featcache"] = attrs_json.read(view_meta["attributes"])
        del view_meta["attributes"]["featcache"]["created"]
        path.write_text(json.dumps(view_meta))
    assert list(Cache.open(root).views) == ["b@224", "a@224"]
    Cache.open(root).create_view(spec(key="c@224"), shard_size=4)
    assert list(Cache.open(root).views) == ["b@224", "a@224", "c@224"]
    manifest = tables.read_manifest(Cache.open(root).root)
    tables.write_table(Cache.open(root).root.join(tables.MANIFEST), manifest.slice(0, 5))
    with pytest.raises(featcache.errors.CacheFormatError, match="it has 5 rows, the last 1 of the 6"):
        Cache.open(root).check_manifest()


def test_rewriting_a_shard_removes_the_temporary_file_a_killed_writer_left(tmp_path):
    """zarr writes each local object through ``<object>.<hex>.partial``; a kill -9 mid-write leaves it."""
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=8, shard_size=4)
    write_all(view)
    shard_dir = tmp_path / "cache" / "features.zarr" / view.key / "dense" / "c" / "1" / "0" / "0"
    leftover = shard_dir / "0.9799a903193940d2882bfa4b05e29028.partial"
    leftover.write_bytes(b"half a shard")
    view.write_shard(4, **shard_data(view, 1))
    assert sorted(p.name for p in shard_dir.iterdir()) == ["0"]
