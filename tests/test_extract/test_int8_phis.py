"""The int8-phis codec end to end: calibration inside the Ray job, codes written by the workers,
read back as PHI-S or raw floats and compared with the teacher's float outputs computed directly."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import zarr

import featcache
from featcache.errors import CacheFormatError, UsageError
from featcache.extract.calibration import calibrate_locally, sample_rows
from featcache.extract.config import from_dict
from featcache.extract.plan import prepare
from featcache.extract.worker import ShardWorker
from featcache.stats import compute
from featcache.store.statsio import read_stats, stats_digest
from featcache.pipelines import stats as stats_job
from featcache.pipelines.extract import run
from featcache.store import attrs as attrs_json
from tests.test_extract.conftest import direct, stored

INT8 = ["siglip2@64", "dinov3@64", "dinov3@96", "sam3-mosaic2@56"]
F16 = ["dinov3f16@64", "dinov3f16@96"]


CALIBRATION = sample_rows(10, 5, 0)  # the 5 of the 10 photos the job calibrates on (seed 0)
HELD_OUT = [i for i in range(10) if i not in CALIBRATION]


def job(out, source, teachers: dict):
    return from_dict({"source": str(source), "output": str(out), "shard_size": 4, "batch_size": 3,
                      "calibration_images": 5, "teachers": [
        {"family": "siglip2", "source": teachers["siglip2"], "codec": "int8-phis"},
        {"family": "dinov3", "source": teachers["dinov3"], "resolutions": [64, 96], "codec": "int8-phis"},
        {"family": "sam3", "source": teachers["sam3"], "mosaic": 2, "codec": "int8-phis"},
        {"family": "dinov3", "name": "dinov3f16", "source": teachers["dinov3"], "resolutions": [64, 96]}]},
        "int8 job")


pytestmark = pytest.mark.usefixtures("ray_runtime")  # its jobs run on the shared embedded Ray


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, photos_dir, job_teachers):
    out = tmp_path_factory.mktemp("int8") / "cache"
    log = io.StringIO()
    result = run(job(out, photos_dir, job_teachers), stream=log)
    return out, result, log.getvalue()


def _phis_truth(cache, key):
    """The teacher's float outputs (computed directly, image by image) mapped with the view's PHI-S."""
    x = direct(cache, key)["dense"].astype(np.float64)
    stats = read_stats(cache.view(key))  # the version the attrs name, checked against its hash
    return x, (x - stats["mean"]) @ stats["rotation"].astype(np.float64).T


def test_job_calibrates_then_writes_and_verifies(extracted):
    out, result, log = extracted
    assert result.exit_code == 0 and result.processed == 3
    assert f"calibrating int8-phis for {', '.join(INT8)} on 5 images" in log
    assert featcache.verify(str(out)).ok
    cache = featcache.open_cache(str(out))
    for key in INT8:
        view = cache.view(key)
        q, s = view.attrs["quantization"], view.stats
        assert view.group["dense"].dtype == np.int8 and view.group["summary"].dtype == np.float16
        assert q["stats_hash"] == s["hash"] and s["frozen"] and s["source"] == "calibration"
        assert q["calibration"]["images"] == 5 and s["tokens"] == 5 * view.spec.grid[0] * view.spec.grid[1]
        assert q["relative_mse"] <= 1e-3
    # the f16 twins got their statistics from the cache at the end of the job, as before
    assert all(cache.view(k).stats["source"] == "cache" for k in F16)


@pytest.mark.parametrize("key", INT8)
def test_phis_space_error_is_within_1e3_of_the_teachers_floats(extracted, key):
    out, _, _ = extracted
    cache = featcache.open_cache(str(out))
    x, y = _phis_truth(cache, key)
    with cache.view(key).reader() as reader:
        got = np.stack([reader.read_dense(i, space="phis") for i in range(10)]).astype(np.float64)
        raw = np.stack([reader.read(i).dense for i in range(10)])
        codes = np.stack([reader.read_dense(i, space="stored") for i in range(10)])
    for rows in (CALIBRATION, HELD_OUT, list(range(10))):  # held out: images the calibration never saw
        relative = ((got[rows] - y[rows]) ** 2).sum() / (y[rows] ** 2).sum()
        assert relative <= 1e-3, (rows, relative)
    assert codes.dtype == np.int8 and np.array_equal(codes, stored(out, key)["dense"])
    assert raw.dtype == np.float32 and ((raw - x) ** 2).sum() / ((x - x.mean(axis=(0, 1, 2))) ** 2).sum() <= 1e-3
    # the statistics are those of the calibration images: unit variance per channel there (not for a
    # mosaic view: its calibration composed other mosaics than the shards, and SAM3 tiles see each other)
    if "mosaic" not in key:
        assert np.abs(y[CALIBRATION].reshape(-1, y.shape[-1]).var(axis=0) - 1).max() < 1e-3


def test_int8_dense_takes_at_most_052_of_f16_bytes(extracted):
    """Bytes of the stored dense shards (chunk checksums and shard indices included; the array's
    metadata file, the same size for every codec, is not)."""
    out, _, _ = extracted
    sizes = {}
    for key in ("dinov3@64", "dinov3f16@64", "dinov3@96", "dinov3f16@96"):
        sizes[key] = sum(p.stat().st_size for p in (out / "features.zarr" / key / "dense" / "c").rglob("*")
                         if p.is_file())
    for res in (64, 96):
        ratio = sizes[f"dinov3@{res}"] / sizes[f"dinov3f16@{res}"]
        assert ratio <= 0.52, (res, ratio, sizes)


def test_stats_job_keeps_the_calibration_statistics(extracted):
    out, _, _ = extracted
    cache = featcache.open_cache(str(out))
    before = {k: cache.view(k).stats["hash"] for k in INT8 + F16}
    rows = stats_job.run(str(out), INT8 + F16[:1], recompute=True)
    notes = {r.key: r.note for r in rows}
    assert all("int8-phis calibration on 5 images" in notes[k] for k in INT8)
    cache = featcache.open_cache(str(out))
    assert {k: cache.view(k).stats["hash"] for k in INT8} == {k: before[k] for k in INT8}
    assert "frozen" not in notes[F16[0]] and cache.view(F16[0]).stats["hash"] == before[F16[0]]  # same data, same seed
    with pytest.raises(UsageError, match="cannot be recomputed"):
        compute.compute_view(cache.view("dinov3@64"))


def test_rerun_does_not_calibrate_again(extracted, job_teachers, photos_dir):
    out, _, _ = extracted
    attrs = {k: featcache.open_cache(str(out)).view(k).attrs["quantization"] for k in INT8}
    log = io.StringIO()
    result = run(job(out, photos_dir, job_teachers), stream=log)
    assert result.exit_code == 0 and result.processed == 0 and "calibrating" not in log.getvalue()
    assert {k: featcache.open_cache(str(out)).view(k).attrs["quantization"] for k in INT8} == attrs


def test_plain_worker_calibrates_and_writes_the_same_codes(extracted, tmp_path, job_teachers):
    out, _, _ = extracted
    again = tmp_path / "again"
    plan = prepare(job(again, out, job_teachers))
    worker = ShardWorker(str(again), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views],
                         batch_size=3)
    with pytest.raises(UsageError, match="has no calibration yet"):
        worker.process(0)
    assert calibrate_locally(plan, worker) == INT8
    for shard in plan.todo:
        worker.process(shard)
    worker.close()
    a, b = featcache.open_cache(str(out)), featcache.open_cache(str(again))
    for key in INT8:
        assert a.view(key).stats["hash"] == b.view(key).stats["hash"], key
        assert np.array_equal(stored(out, key)["dense"], stored(again, key)["dense"]), key


def test_codes_refuse_to_decode_with_other_statistics(extracted, tmp_path):
    out, _, _ = extracted
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    path = featcache.open_cache(str(copy)).view("dinov3@64").stats["path"]
    mean = zarr.open_array(str(copy / "features.zarr" / "dinov3@64" / path / "mean"), mode="r+")
    mean[0] = mean[0] + 1.0
    report = featcache.verify(str(copy))
    assert [p.kind for p in report.problems] == ["codec"] and "do not match their recorded hash" in str(report.problems[0])
    with featcache.open_cache(str(copy)).view("dinov3@64").reader() as reader:
        with pytest.raises(CacheFormatError, match="cannot be decoded"):
            reader.read(0)
        assert reader.read_dense(0, space="stored").dtype == np.int8  # the codes themselves stay readable
    arrays = {n: a[...] for n, a in zarr.open_group(str(out / "features.zarr" / "dinov3@64" / path)).arrays()}
    assert stats_digest(arrays) == featcache.open_cache(str(out)).view("dinov3@64").stats["hash"]


def test_codes_and_commits_name_their_statistics(extracted, tmp_path):
    out, _, _ = extracted
    copy = tmp_path / "renamed"
    shutil.copytree(out, copy)
    view = featcache.open_cache(str(copy)).view("dinov3@96")
    recorded = view.attrs["quantization"]["stats_hash"]
    assert all(view.commit_record(k).info["stats_hash"] == recorded for k in range(3))
    marker = copy / "_commits" / "dinov3@96" / "1.json"  # a shard written under other statistics
    marker.write_text(marker.read_text().replace(recorded, "sha256:" + "0" * 64))
    assert [(p.kind, p.shard) for p in featcache.verify(str(copy)).problems] == [("codec", 1)]
    attrs = view.attrs
    attrs["quantization"] = {**attrs["quantization"], "stats_hash": "sha256:" + "1" * 64}
    attrs_json.write(zarr.open_group(str(copy / "features.zarr" / "dinov3@96"), mode="r+"), attrs)
    with featcache.open_cache(str(copy)).view("dinov3@96").reader() as reader:
        with pytest.raises(CacheFormatError, match="were written with statistics sha256:1111"):
            reader.read_dense(0, space="phis")


def test_uncommitted_rows_read_as_zeros_in_every_space(extracted, tmp_path):
    out, _, _ = extracted
    copy = tmp_path / "uncommitted"
    shutil.copytree(out, copy)
    (copy / "_commits" / "dinov3@64" / "2.json").unlink()
    with featcache.open_cache(str(copy)).view("dinov3@64").reader() as reader:
        for space, dtype in (("raw", np.float32), ("phis", np.float32), ("stored", np.int8)):
            sample = reader.read(9, space=space)
            assert not sample.valid and sample.dense.dtype == dtype and not sample.dense.any()
        assert reader.read(0).valid and reader.read(0).dense.any()
