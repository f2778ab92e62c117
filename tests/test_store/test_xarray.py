"""The cache read by tools featcache does not control: xarray (a Dataset per view, a DataTree of the
whole cache) and tensorstore, against featcache's own reader; and consolidated metadata that never
fools featcache's readers while a later job writes."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

xr = pytest.importorskip("xarray")

from featcache.stats.compute import compute_view  # noqa: E402
from featcache.store import Cache  # noqa: E402
from tests.support.caches import make_cache, shard_data, spec, write_all  # noqa: E402

TILED = "sam3@1008"  # a second view, stored as tiles of its grid
ERRORS = {5: "decode: corrupt JPEG"}


def _cache(root: str, consolidate: bool = True) -> Cache:
    """Two written views with statistics (the state after ``extract`` then ``stats``)."""
    cache, view = make_cache(root, n=10, shard_size=4)
    tiled = cache.create_view(spec(key=TILED, grid=(4, 6), channels=8, tile=(2, 3), dtype="float32"))
    for v in (view, tiled):
        write_all(v, errors=ERRORS)
        compute_view(v)
    if consolidate:
        Cache.open(root).consolidate()
    return Cache.open(root)


def _open(root: str, group: str):
    """``xr.open_zarr`` as a user calls it, any warning being an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(os.path.join(root, "features.zarr"), group=group).load()


def _assert_same_as_reader(ds, view) -> None:
    with view.reader() as reader:
        for i in range(view.num_images):
            s = reader.read(i)
            np.testing.assert_array_equal(ds["dense"].values[i], s.dense, strict=True)
            np.testing.assert_array_equal(ds["summary"].values[i], s.summary, strict=True)
            np.testing.assert_array_equal(ds["box"].values[i], s.box, strict=True)
            assert bool(ds["valid"].values[i]) == s.valid


def test_every_view_opens_in_xarray_with_featcache_s_values(tmp_path):
    root = str(tmp_path / "c")
    cache = _cache(root)
    for key, view in cache.views.items():
        ds = _open(root, key)
        assert dict(ds.sizes) == {"image": 10, "row": 4, "col": 6, "channel": 8, "summary_channel": 5, "xyxy": 4}
        _assert_same_as_reader(ds, view)
        assert not ds["valid"].values[5] and ds["valid"].values.sum() == 9


def test_image_id_is_a_coordinate_a_user_selects_by(tmp_path):
    root = str(tmp_path / "c")
    cache = _cache(root)
    ds = _open(root, "dinov3@224")
    assert "image_id" in ds.coords and ds["image_id"].dims == ("image",)
    assert list(ds["image_id"].values) == cache.manifest.column("image_id").to_pylist()
    row = ds.set_xindex("image_id").sel(image_id="img00007")
    with cache.view("dinov3@224").reader() as reader:
        np.testing.assert_array_equal(row["dense"].values, reader.read(7).dense, strict=True)


def test_statistics_arrays_have_named_dimensions(tmp_path):
    root = str(tmp_path / "c")
    view = _cache(root).view("dinov3@224")
    ds = _open(root, f"{view.key}/{view.stats['path']}")
    assert {name: ds[name].dims for name in ds.data_vars} == {
        "mean": ("channel",), "channel_mean": ("channel",), "channel_std": ("channel",),
        "rotation": ("out_channel", "channel"), "inverse": ("channel", "out_channel"),
        "eigenvalues": ("component",), "summary_mean_direction": ("summary_channel",)}
    rotation = view.group[f"{view.stats['path']}/rotation"][...]
    np.testing.assert_array_equal(ds["rotation"].values, rotation, strict=True)


def test_the_whole_cache_opens_as_a_datatree(tmp_path):
    root = str(tmp_path / "c")
    cache = _cache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(os.path.join(root, "features.zarr"), engine="zarr")
    assert tree["_manifest"].dims == ("image",) and set(tree.children) == {"dinov3@224", TILED}
    view = cache.view(TILED)
    _assert_same_as_reader(tree[TILED].to_dataset().load(), view)
    assert tree[f"{TILED}/{view.stats['path']}"]["mean"].sizes == {"channel": 8}


def test_tensorstore_reads_the_dense_array(tmp_path):
    ts = pytest.importorskip("tensorstore")
    root = str(tmp_path / "c")
    view = _cache(root).view(TILED)
    path = os.path.join(root, "features.zarr", TILED, "dense")
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, read=True).result()
    assert tuple(arr.domain.labels) == ("image", "row", "col", "channel")
    dense = arr.read().result()
    with view.reader() as reader:
        for i in range(view.num_images):
            np.testing.assert_array_equal(dense[i], reader.read(i).dense, strict=True)


def test_featcache_reads_live_metadata_after_consolidation(tmp_path):
    """A job writing after the last consolidation: new shards, a new view, new statistics."""
    root = str(tmp_path / "c")
    cache, view = make_cache(root, n=10, shard_size=4)
    view.write_shard(0, **shard_data(view, 0))
    compute_view(view)
    cache.consolidate()
    old_hash = Cache.open(root).view(view.key).stats["hash"]
    view.write_shard(4, **shard_data(view, 1, seed=3))
    compute_view(view)  # not frozen: 1 of 3 shards was committed, the recompute republishes
    cache.create_view(spec(key=TILED, tile=(2, 3)))
    again = Cache.open(root)
    assert list(again.views) == ["dinov3@224", TILED]
    fresh = again.view("dinov3@224")
    assert fresh.stats["hash"] != old_hash and fresh.stats["shards"] == [2, 3]
    with fresh.reader() as reader:
        np.testing.assert_array_equal(reader.read(5).dense, shard_data(view, 1, seed=3)["dense"][1], strict=True)


def test_a_view_round_trips_through_netcdf_with_its_attrs(tmp_path):
    """``featcache`` attrs are a JSON string: netCDF refuses nested objects (it refused every view)."""
    import json

    pytest.importorskip("scipy")
    root = str(tmp_path / "c")
    view = _cache(root).view(TILED)  # float32: netCDF 3 has no float16 (cast f16 views first)
    ds = _open(root, TILED)
    path = tmp_path / "view.nc"
    ds.to_netcdf(path, engine="scipy")
    back = xr.open_dataset(path, engine="scipy").load()
    for name in ds.variables:
        np.testing.assert_array_equal(back[name].values, ds[name].values.astype(back[name].dtype))
    assert json.loads(back.attrs["featcache"]) == view.attrs and view.attrs["key"] == TILED


def test_views_written_by_earlier_versions_get_today_s_metadata_at_the_next_job_end(tmp_path):
    """Caches from before: attrs stored as objects, summary dimensions ("image", "channel"), no image_id."""
    import json
    import shutil

    root = tmp_path / "c"
    cache = _cache(str(root), consolidate=False)
    before = {k: v.reader().read(3).dense.copy() for k, v in cache.views.items()}
    for meta_path in [root / "features.zarr" / "zarr.json"] + [root / "features.zarr" / k / "zarr.json" for k in before]:
        meta = json.loads(meta_path.read_text())
        meta["attributes"] = {"featcache": json.loads(meta["attributes"]["featcache"])}
        meta_path.write_text(json.dumps(meta))
    for key in before:
        shutil.rmtree(root / "features.zarr" / key / "image_id")
        summary = root / "features.zarr" / key / "summary" / "zarr.json"
        summary.write_text(summary.read_text().replace('"summary_channel"', '"channel"'))
    old = Cache.open(str(root))
    assert old.view(TILED).stats["path"]  # the old form reads as before
    old.consolidate()  # what extract and stats do at their end
    assert Cache.open(str(root)).upgrade_metadata() == []  # done once
    for key, dense in before.items():
        ds = _open(str(root), key)
        assert ds["summary"].dims == ("image", "summary_channel") and "image_id" in ds.coords
        np.testing.assert_array_equal(ds["dense"].values[3], dense)
    ds = _open(str(root), TILED)
    ds.to_netcdf(tmp_path / "old.nc", engine="scipy")
