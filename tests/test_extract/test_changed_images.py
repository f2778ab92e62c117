"""An image replaced (or touched) after indexing is recorded as failed, never extracted as if it were
the indexed one; manifests written before size/mtime were recorded still extract (no check)."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np

import featcache
from featcache.extract.config import from_dict
from featcache.store.location import locate
from featcache.store import tables
from featcache.pipelines.extract import run
from tests.support.images import photo
from tests.test_extract.conftest import stored

CHANGED = "changed since indexing (re-index to accept the change)"
NAMES = ("astronaut", "chelsea", "coffee", "camera", "horse")


def _indexed(folder):
    """Five real photos in ``folder``/src, indexed into ``folder``/cache; returns (src, cache)."""
    src, out = folder / "src", folder / "cache"
    src.mkdir()
    for name in NAMES:
        shutil.copyfile(photo(name), src / photo(name).name)
    featcache.index(src, out)
    return src, out


def _extract(src, out, teachers):
    config = from_dict({"source": str(src), "output": str(out), "shard_size": 8, "batch_size": 4,
                        "stats": False, "teachers": [
                            {"family": "dinov3", "source": teachers["dinov3"], "codec": "f32"}]})
    return run(config, stream=io.StringIO())


def test_replaced_and_touched_images_are_failed_with_the_reason(tmp_path, job_teachers, ray_runtime):
    src, out = _indexed(tmp_path)
    shutil.copyfile(photo("coffee"), src / "chelsea.png")  # 451x300 -> 600x400, another byte count
    st = os.stat(src / "camera.png")
    os.utime(src / "camera.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    result = _extract(src, out, job_teachers)
    assert result.exit_code == 1 and result.failed_images == 2 and not result.failed_shards
    ids = featcache.open_cache(str(out)).manifest.column("image_id").to_pylist()
    valid = stored(out, "dinov3@64")["valid"]
    assert {ids[i]: int(v) for i, v in enumerate(valid)} == {
        "astronaut.png": 1, "camera.png": 0, "chelsea.png": 0, "coffee.png": 1, "horse.png": 1}
    errors = tables.read_errors(locate(str(out))).to_pylist()
    assert sorted((r["image_id"], r["stage"], r["reason"]) for r in errors) == [
        ("camera.png", "decode", CHANGED), ("chelsea.png", "decode", CHANGED)]
    assert featcache.verify(str(out)).ok


def test_a_manifest_without_size_and_mtime_still_extracts(tmp_path, job_teachers, ray_runtime):
    src, out = _indexed(tmp_path)
    root = locate(str(out))
    old = tables.read_manifest(root).select(list(tables.MANIFEST_COLUMNS))
    tables.write_table(root.join(tables.MANIFEST), old)
    os.utime(src / "camera.png", (1.5e9, 1.5e9))  # nothing recorded to compare with
    result = _extract(src, out, job_teachers)
    assert result.exit_code == 0 and result.failed_images == 0
    assert np.array_equal(stored(out, "dinov3@64")["valid"], np.ones(len(NAMES), np.uint8))
    assert tables.read_errors(root).num_rows == 0
