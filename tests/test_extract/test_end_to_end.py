"""index -> extract (Ray, embedded) -> verify, and every stored row against a direct computation."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import numpy as np
import pytest

import featcache
from featcache.cli import main
from featcache.extract.plan import prepare
from featcache.extract.worker import ShardWorker
from featcache.store import tables
from featcache.pipelines.extract import run
from tests.support.ray_runtime import SHARED
from tests.test_extract.conftest import direct, stored, three_family_job

VIEWS = ["siglip2@64", "dinov3@64", "dinov3@96", "sam3-mosaic2@56"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, photos_dir, job_teachers):
    SHARED.stop()  # this job starts its own Ray, as a user's does: its log is checked for "starting Ray"
    out = tmp_path_factory.mktemp("e2e") / "cache"
    featcache.index(str(photos_dir), str(out))
    log = io.StringIO()
    result = run(three_family_job(out, out, job_teachers), stream=log)  # source = the indexed cache
    return out, result, log.getvalue()


def test_job_completes_and_verifies(extracted):
    out, result, log = extracted
    assert result.exit_code == 0 and result.failed_images == 0 and not result.failed_shards
    assert result.views == VIEWS and result.shards == 3 and result.processed == 3 and result.images == 10
    assert 0 < result.processing_seconds < result.seconds  # the bar's time excludes Ray's start and the stats
    assert result.images_per_second == pytest.approx(10 / result.processing_seconds)
    assert "using the manifest of" in log
    said = [log.index(text) for text in ("starting Ray", "loading teachers on 1 worker…",
                                         "1 worker (cpu, ", "10/10 images")]
    assert said == sorted(said), log  # a word before each wait, in the order a user sees them
    assert re.search(r"\n1 worker \(cpu, (1 torch thread|\d+ torch threads) each\) on 1 node\n", log), log
    report = featcache.verify(str(out))
    assert report.ok, report.problems
    assert report.shards_checked == 3 * len(VIEWS)
    cache = featcache.open_cache(str(out))
    assert set(cache.views) == set(VIEWS)
    assert cache.view("sam3-mosaic2@56").spec.mosaic == 2
    # stats ran at the end: every view fully committed, so frozen, and the table was printed
    assert all(cache.view(k).stats["frozen"] and cache.view(k).stats["tokens"] > 0 for k in VIEWS)
    assert "summary dispersion" in log and all(k in log.split("summary dispersion")[1] for k in VIEWS)


@pytest.mark.parametrize("key", VIEWS)
def test_every_row_equals_a_direct_computation(extracted, key):
    out, _, _ = extracted
    got, want = stored(out, key), direct(featcache.open_cache(str(out)), key)
    assert np.array_equal(got["valid"], want["valid"]) and want["valid"].all()
    assert np.array_equal(got["box"], want["box"])
    assert np.abs(got["dense"] - want["dense"]).max() <= 1e-5
    assert np.abs(got["summary"] - want["summary"]).max() <= 1e-5


def test_boxes_are_the_whole_image_under_squash(extracted):
    out, _, _ = extracted
    manifest = featcache.open_cache(str(out)).manifest
    boxes = stored(out, "dinov3@64")["box"]
    sizes = np.stack([manifest.column("width").to_numpy(), manifest.column("height").to_numpy()], axis=1)
    assert np.array_equal(boxes[:, 2:], sizes) and not boxes[:, :2].any()


def test_plain_shard_worker_without_ray_writes_the_same_bytes(extracted, tmp_path, job_teachers):
    out, _, _ = extracted
    again = tmp_path / "again"
    plan = prepare(three_family_job(again, out, job_teachers))  # copies the manifest, creates the views
    assert sorted(plan.todo) == [0, 1, 2]
    worker = ShardWorker(str(again), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views],
                         batch_size=3)
    seen, running = [], threading.Event()

    def watch():  # what the driver's progress() calls see while a shard runs: they move per batch
        while not running.is_set():
            seen.append(tuple(worker.progress().values()))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for shard in plan.todo:
        worker.process(shard, prefetch=shard + 1 if shard + 1 in plan.todo else None)
    running.set()
    watcher.join()
    worker.close()
    assert worker.progress() == {"shard": 2, "images": 2}  # the last shard holds images 8 and 9
    for shard, size in ((0, 4), (1, 4), (2, 2)):
        counts = [n for s, n in seen if s == shard]
        assert counts == sorted(counts) and set(counts) - {0, size}, (shard, sorted(set(counts)))
    for key in VIEWS:
        a, b = stored(out, key), stored(again, key)
        assert all(np.array_equal(a[n], b[n]) for n in a), key


def test_rerun_skips_committed_shards_and_says_so(extracted, job_teachers):
    out, _, _ = extracted
    log = io.StringIO()
    result = run(three_family_job(out, out, job_teachers), stream=log)
    assert result.exit_code == 0 and result.skipped == 3 and result.processed == 0
    assert "resuming: 3 of 3 shards already committed in every view, 0 to do" in log.getvalue()
    runs = featcache.open_cache(str(out)).root.join("runs")
    assert len(runs.fs.ls(runs.path)) == 2  # one run record per job


def test_a_data_changing_config_is_refused(extracted, job_teachers, capsys):
    out, _, _ = extracted
    code = main(["extract", "--source", str(out), "--out", str(out),
                 "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64,codec=f16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("featcache: error: view dinov3@64 already exists with other settings (codec: "
                             "'f32' -> 'f16'")
    code = main(["extract", "--source", str(out), "--out", str(out), "--view-policy", "center",
                 "--teacher", f"family=siglip2,source={job_teachers['siglip2']},codec=f32"])
    assert code == 2 and "view_policy: 'squash' -> 'center'" in capsys.readouterr().err


def test_errors_table_is_empty_and_manifest_untouched(extracted, photos_dir):
    out, _, _ = extracted
    cache = featcache.open_cache(str(out))
    assert tables.read_errors(cache.root).num_rows == 0
    assert cache.manifest.num_rows == 10


def test_viz_writes_a_pca_picture_of_every_view(extracted, tmp_path, capsys):
    from PIL import Image

    out, _, _ = extracted
    png = tmp_path / "astronaut.png"
    assert main(["viz", str(out), "--image", "astronaut.png", "--out", str(png)]) == 0
    picture = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    # the image and four views side by side, each panel 256 px high plus an 18 px label
    assert picture.shape[0] == 274 and picture.shape[1] > 5 * 256
    assert picture.std() > 30  # not blank
    panel = picture[18:, -256:]  # the last view's PCA panel: its 4x4 cells take several colours
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) >= 8


def test_viz_error_heatmap_between_two_resolutions(extracted, tmp_path):
    from PIL import Image

    out, _, _ = extracted
    png = tmp_path / "error.png"
    assert main(["viz", str(out), "--image", "coffee.png", "--error", "dinov3@64", "--error", "dinov3@96",
                 "--out", str(png)]) == 0
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape[0] == 274 and picture[18:, -100:].std() > 10


def test_viz_bad_arguments(extracted, tmp_path, capsys):
    out, _, _ = extracted
    assert main(["viz", str(out), "--image", "nope.png", "--out", str(tmp_path / "x.png")]) == 2
    assert "no image 'nope.png'" in capsys.readouterr().err
    assert main(["viz", str(out), "--image", "coffee.png", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "viz writes PNG files" in capsys.readouterr().err


def _edited_copy(out, tmp_path, name: str, edit):
    """A copy of the extracted cache with one shard uncommitted and its manifest edited by ``edit``."""
    import shutil

    import pyarrow as pa

    root = tmp_path / name
    shutil.copytree(out, root)
    (root / "_commits" / "dinov3@64" / "1.json").unlink()  # a rerun would write shard 1 again
    manifest = tables.read_manifest(featcache.open_cache(str(root)).root)
    tables.write_table(featcache.open_cache(str(root)).root.join(tables.MANIFEST), edit(manifest, pa))
    return root


_EDITS = {
    "reordered": lambda m, pa: m.take(list(reversed(range(m.num_rows)))),
    "one row changed": lambda m, pa: m.set_column(2, "uri", pa.array(
        [u if i != 5 else u + ".moved.png" for i, u in enumerate(m.column("uri").to_pylist())])),
    "one row added": lambda m, pa: pa.concat_tables([m, m.slice(0, 1).set_column(
        1, "image_id", pa.array(["extra.png"])).set_column(0, "index", pa.array([m.num_rows], pa.int64()))]),
    "one row removed": lambda m, pa: m.slice(0, m.num_rows - 1),
}


@pytest.mark.parametrize("edit", list(_EDITS))
def test_an_edited_manifest_is_refused_by_extract_stats_and_verify(extracted, job_teachers, tmp_path, capsys, edit):
    """Rows are positions: after the manifest was reordered or edited, a rerun must not write other images'
    features into the uncommitted shard; extract, stats and verify refuse with one line, exit 2."""
    out, _, _ = extracted
    root = _edited_copy(out, tmp_path, "edited", _EDITS[edit])
    before = stored(root, "dinov3@64")
    code = main(["extract", "--out", str(root), "--no-stats",
                 "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64,codec=f32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "manifest.parquet no longer matches the cache" in err[0], err
    expected = {"reordered": "row 0 (image_id", "one row changed": "row 5 (image_id",
                "one row added": "it has 11 rows, 1 more than the 10", "one row removed": "it has 9 rows, the last 1 of the 10"}[edit]
    assert expected in err[0]
    assert not (root / "_commits" / "dinov3@64" / "1.json").exists()
    after = stored(root, "dinov3@64")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    for argv in (["verify", str(root)], ["stats", str(root), "--recompute"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no longer matches" in err[0], (argv, err)


@pytest.mark.usefixtures("ray_runtime")  # its jobs on the shared embedded Ray
def test_repair_recomputes_what_verify_flags(extracted, job_teachers, tmp_path, capsys):
    """A truncated shard object is caught by verify; a plain rerun leaves it (its marker is there), and
    ``extract --repair`` uncommits and recomputes it: the cache then equals the undamaged one byte for byte."""
    import shutil

    out, _, _ = extracted
    root = tmp_path / "damaged"
    shutil.copytree(out, root)
    obj = root / "features.zarr" / "dinov3@64" / "dense" / "c" / "1" / "0" / "0" / "0"
    obj.write_bytes(obj.read_bytes()[:-100])
    assert [(p.kind, p.shard) for p in featcache.verify(str(root)).problems] == [("checksum", 1)]
    argv = ["extract", "--out", str(root), "--no-stats",
            "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64+96,codec=f32"]
    assert main(argv) == 0 and not featcache.verify(str(root)).ok  # resume: every shard has its marker
    capsys.readouterr()
    assert main([*argv, "--repair"]) == 0
    err = capsys.readouterr().err
    assert "repair: dinov3@64 shard 1: checksum: dense/c/1/0/0/0 differs from what was written" in err
    assert featcache.verify(str(root)).ok
    for key in ("dinov3@64", "dinov3@96"):
        a, b = stored(out, key), stored(root, key)
        assert all(np.array_equal(a[k], b[k]) for k in a), key


@pytest.mark.usefixtures("ray_runtime")  # its jobs on the shared embedded Ray
def test_a_damaged_commit_marker_is_reported_and_repaired(extracted, job_teachers, tmp_path, capsys):
    """A marker listing a row outside its shard: a rerun reports it (exit 1, no traceback), --repair mends it."""
    import json
    import shutil

    out, _, _ = extracted
    root = tmp_path / "marker"
    shutil.copytree(out, root)
    path = root / "_commits" / "dinov3@64" / "0.json"
    marker = json.loads(path.read_text())
    marker["errors"]["9"] = "made up"
    path.write_text(json.dumps(marker))
    argv = ["extract", "--out", str(root), "--no-stats",
            "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64+96,codec=f32"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "damaged: dinov3@64 shard 0: commit marker" in err and "outside its rows [0, 4)" in err
    assert "Traceback" not in err
    assert main([*argv, "--repair"]) == 0 and featcache.verify(str(root)).ok
    a, b = stored(out, "dinov3@64"), stored(root, "dinov3@64")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("ray_runtime")  # no work for Ray here: it keeps the runtime up between its neighbours
def test_quiet_verbose_and_library_logging(extracted, job_teachers, capsys):
    """The CLI shows featcache's log lines on stderr, none with --quiet; the library logs through the
    ``featcache`` logger and prints nothing itself."""
    import logging

    out, _, _ = extracted
    argv = ["extract", "--out", str(out), "--no-stats",
            "--teacher", f"family=dinov3,source={job_teachers['dinov3']},resolutions=64+96,codec=f32"]
    assert main(["--quiet", *argv]) == 0
    assert capsys.readouterr().err == ""
    assert main(argv) == 0
    assert "resuming: 3 of 3 shards already committed in every view" in capsys.readouterr().err
    logger = logging.getLogger("featcache")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run(three_family_job(out, out, job_teachers, stats=False))  # no stream: the logger, not stderr
    finally:
        logger.removeHandler(handler)
    assert any(r.startswith("resuming: 3 of 3 shards") for r in records), records


@pytest.mark.usefixtures("ray_runtime")  # its jobs on the shared embedded Ray
def test_teacher_pools_run_in_turn_and_write_the_same_bytes(extracted, job_teachers, tmp_path):
    """Pools in an order other than the config's (SAM3 first): each pool's actors load only its
    teachers, and every view holds exactly what the one-pool job stored."""
    out, _, _ = extracted
    again, log = tmp_path / "pooled", io.StringIO()
    job = three_family_job(again, out, job_teachers, teacher_pools=[["sam3"], ["siglip2", "dinov3"]], stats=False)
    result = run(job, stream=log)
    assert result.exit_code == 0 and result.processed == 3 + 3 and result.images == 20  # each pool: 3 shards
    text = log.getvalue()
    said = [text.index(s) for s in ("2 teacher pools, run in turn: sam3; siglip2 + dinov3",
                                    "teacher pool 1 of 2: sam3", "teacher pool 2 of 2: siglip2 + dinov3")]
    assert said == sorted(said), text
    for key in VIEWS:
        a, b = stored(out, key), stored(again, key)
        assert all(np.array_equal(a[n], b[n]) for n in a), key
    record = json.loads(open(result.record).read())
    assert record["teacher_pools"] == [["sam3"], ["siglip2", "dinov3"]]
    assert record["config"]["teacher_pools"] == [["sam3"], ["siglip2", "dinov3"]]


def test_plan_predicts_the_bytes_the_job_stored(extracted, job_teachers):
    """``featcache plan`` for the same job: each view's array objects exactly; everything the view
    holds (metadata, statistics, image ids, its commit markers) from above, within 30% at this toy scale
    (the statistics, counted uncompressed, are most of it for 32 channels and 10 images)."""
    from featcache import estimate, roofline

    out, _, _ = extracted
    ids = featcache.open_cache(str(out)).manifest.column("image_id").to_pylist()
    plan = estimate.estimate(three_family_job(out, out, job_teachers), 10, roofline.HARDWARE["h100"], shard_size=4,
                             image_id_bytes=sum(len(i) + 4 for i in ids) / len(ids))
    assert [v["key"] for v in plan["views"]] == VIEWS
    for v in plan["views"]:
        folder = out / "features.zarr" / v["key"]
        data = sum(f.stat().st_size for name in ("dense", "summary", "box", "valid")
                   for f in (folder / name / "c").rglob("*") if f.is_file())
        everything = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) + sum(
            f.stat().st_size for f in (out / "_commits" / v["key"]).glob("*.json"))
        assert v["bytes"] == data, v["key"]
        assert everything <= v["bytes"] + v["overhead_bytes"] <= 1.3 * everything, (v["key"], everything, v)
    assert plan["total_bytes"] == sum(v["bytes"] + v["overhead_bytes"] for v in plan["views"])
