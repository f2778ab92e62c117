"""A job over a folder of bad and odd images: good ones extracted as displayed, bad ones recorded."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

import featcache
from featcache.extract.config import from_dict
from featcache.store import tables
from featcache.pipelines.extract import run
from tests.support.images import photo, write_header_cases
from tests.test_extract.conftest import direct, stored

DECODE_FAILS = {"header_only_30000.png": "900.0 MP, over the 179.0 MP limit",
                "bomb_20000.png": "400.0 MP, over the 179.0 MP limit",
                "corrupt_body.jpg": "cannot decode: OSError",
                "truncated_half.png": "cannot decode: OSError: image file is truncated"}
INDEX_FAILS = ("empty.jpg", "notes.jpg", "truncated_20.png", "corrupt_header.jpg", "dangling.png", "pipe.jpg")
GOOD = ("one_pixel.png", "gray.png", "gray16.png", "rgba.png", "palette.png", "cmyk.jpg", "orientation6.jpg",
        "фото café 1.png", "astronaut.png")


pytestmark = pytest.mark.usefixtures("ray_runtime")  # its jobs run on the shared embedded Ray


@pytest.fixture(scope="module")
def job(tmp_path_factory, job_teachers):
    src = tmp_path_factory.mktemp("bad_source")
    write_header_cases(src)
    shutil.copyfile(photo("astronaut"), src / "astronaut.png")
    out = tmp_path_factory.mktemp("bad_job") / "cache"
    config = from_dict({"source": str(src), "output": str(out), "shard_size": 4, "batch_size": 4, "stats": False,
                        "teachers": [
        {"family": "dinov3", "source": job_teachers["dinov3"], "codec": "f32"}]})
    log = io.StringIO()
    return out, run(config, stream=log), log.getvalue()


def test_job_finishes_with_exit_code_1_and_verifies(job):
    out, result, _ = job
    assert result.exit_code == 1 and not result.failed_shards
    assert result.failed_images == len(DECODE_FAILS) + len(INDEX_FAILS)
    assert featcache.verify(str(out)).ok
    assert featcache.open_cache(str(out)).view("dinov3@64").stats is None  # stats: false


def test_bad_images_are_in_the_errors_table_with_reasons(job):
    out, _, _ = job
    cache = featcache.open_cache(str(out))
    rows = tables.read_errors(cache.root).to_pylist()
    decode_rows = {r["uri"].rsplit("/", 1)[-1]: r for r in rows if r["stage"] == "decode"}
    assert set(decode_rows) == set(DECODE_FAILS)
    for name, reason in DECODE_FAILS.items():
        assert reason in decode_rows[name]["reason"] and decode_rows[name]["view"] == "dinov3@64"
    index_rows = {r["uri"].rsplit("/", 1)[-1] for r in rows if r["stage"] == "index"}
    assert set(INDEX_FAILS) <= index_rows
    valid = stored(out, "dinov3@64")["valid"]
    ids = cache.manifest.column("image_id").to_pylist()
    assert {ids[i] for i in np.flatnonzero(valid == 0)} == set(DECODE_FAILS)


def test_good_images_equal_the_direct_computation(job):
    out, _, _ = job
    cache = featcache.open_cache(str(out))
    got, want = stored(out, "dinov3@64"), direct(cache, "dinov3@64")
    ids = cache.manifest.column("image_id").to_pylist()
    assert {ids[i] for i in np.flatnonzero(got["valid"])} == set(GOOD)
    assert np.array_equal(got["valid"], want["valid"])
    assert np.abs(got["dense"] - want["dense"]).max() <= 1e-5
    # EXIF orientation applied: the box is the displayed 30x40, not the stored 40x30
    assert got["box"][ids.index("orientation6.jpg")].tolist() == [0, 0, 30, 40]
