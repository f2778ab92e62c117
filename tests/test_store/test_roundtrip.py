"""Shards written through featcache read back identically through plain zarr and the fast reader."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from featcache.errors import MisalignedWriteError, UsageError
from featcache.store.s3 import storage_options
from featcache.store import Cache, ViewSpec
from featcache.store import attrs as attrs_json
from tests.support.caches import make_cache, shard_data, spec, write_all


def _plain_group(root: str) -> zarr.Group:
    """Open features.zarr with zarr-python alone (no featcache code in the read path)."""
    path = f"{root}/features.zarr"
    if "://" in root:
        return zarr.open_group(path, mode="r", storage_options=storage_options(root))
    return zarr.open_group(path, mode="r")


@pytest.mark.parametrize("tile", [None, (2, 3)], ids=["whole-image-chunks", "spatial-tiles"])
def test_roundtrip_plain_zarr_and_reader(cache_root, tile):
    cache, view = make_cache(cache_root, n=10, shard_size=4, tile=tile)
    write_all(view, seed=1, errors={5: "decode failed: truncated"})
    group = _plain_group(cache_root)[view.key]
    reader = Cache.open(cache_root).view(view.key).reader(verify_checksums=True)
    for k in range(view.num_shards):
        start, stop = view.shard_range(k)
        want = shard_data(view, k, seed=1)
        for name in ("dense", "summary", "box"):
            expected = want[name].copy()
            if start <= 5 < stop:
                expected[5 - start] = 0
            np.testing.assert_array_equal(group[name][start:stop], expected)
            for i in range(start, stop):
                got = reader.read(i)
                np.testing.assert_array_equal(getattr(got, name), expected[i - start])
                assert got.valid == (i != 5)
    np.testing.assert_array_equal(group["valid"][:], [1] * 5 + [0] + [1] * 4)


def test_window_reads_equal_slices(cache_root):
    _, view = make_cache(cache_root, n=6, shard_size=3, grid=(6, 8), tile=(2, 4))
    write_all(view, seed=2)
    reader = view.reader(verify_checksums=True)
    full = shard_data(view, 1, seed=2)["dense"][1]  # image 4
    for window in [(0, 6, 0, 8), (1, 5, 3, 7), (2, 4, 4, 8), (5, 6, 0, 1), (0, 2, 0, 4)]:
        r0, r1, c0, c1 = window
        np.testing.assert_array_equal(reader.read(4, window).dense, full[r0:r1, c0:c1])


def test_spatial_tiles_move_fewer_bytes(tmp_path):
    _, view = make_cache(str(tmp_path), n=2, shard_size=2, grid=(28, 28), channels=16, tile=(14, 14))
    reader = view.reader()
    assert reader.bytes_for((0, 14, 0, 14)) * 4 == reader.bytes_for(None)
    assert reader.bytes_for((7, 21, 7, 21)) == reader.bytes_for(None)  # straddles all four tiles


def test_attrs_rebuild_the_spec_exactly(cache_root):
    s = spec(tile=(2, 3))
    make_cache(cache_root, n=5, shard_size=2, tile=(2, 3))
    attrs = attrs_json.read(_plain_group(cache_root)[s.key].attrs)
    assert ViewSpec.from_dict(attrs) == s
    root_attrs = attrs_json.read(_plain_group(cache_root).attrs)
    assert root_attrs["num_images"] == 5 and root_attrs["shard_size"] == 2 and root_attrs["manifest"]["rows"] == 5
    # views are discovered from the groups, not from a shared list (which concurrent creators lost)
    assert "views" not in root_attrs and [k for k, _ in _plain_group(cache_root).groups()] == [s.key]
    assert Cache.open(cache_root).view(s.key).spec == s


def test_uncommitted_rows_read_as_invalid(tmp_path):
    _, view = make_cache(str(tmp_path), n=8, shard_size=4)
    view.write_shard(4, **shard_data(view, 1))
    reader = view.reader()
    assert [reader.read(i).valid for i in range(8)] == [False] * 4 + [True] * 4
    assert not reader.read(0).dense.any()


@pytest.mark.parametrize("start,length", [(1, 4), (0, 3), (4, 5), (8, 1), (-4, 4), (12, 4)])
def test_misaligned_write_is_refused(tmp_path, start, length):
    _, view = make_cache(str(tmp_path), n=10, shard_size=4)
    data = shard_data(view, 0)
    with pytest.raises(MisalignedWriteError, match="not one whole shard"):
        view.write_shard(start, data["dense"][:1].repeat(length, 0), data["summary"][:1].repeat(length, 0),
                         data["box"][:1].repeat(length, 0))
    assert view.committed_shards() == set()


def test_wrong_shapes_are_refused(tmp_path):
    _, view = make_cache(str(tmp_path), n=4, shard_size=4)
    data = shard_data(view, 0)
    with pytest.raises(UsageError, match="dense has shape"):
        view.write_shard(0, data["dense"][..., :3], data["summary"], data["box"])


def test_create_view_is_idempotent_and_refuses_changes(tmp_path):
    cache, view = make_cache(str(tmp_path), n=4, shard_size=2)
    assert cache.create_view(spec()).spec == view.spec
    with pytest.raises(UsageError, match="channels: 8 -> 16"):
        cache.create_view(spec(channels=16))
    with pytest.raises(UsageError, match="shard_size 2, not 3"):
        cache.create_view(spec(key="siglip2@384"), shard_size=3)

