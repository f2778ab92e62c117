"""Storage that cannot be written stops a job with one line, and only transient errors are retried.

A full disk (a small tmpfs), a read-only one (a read-only mount: chmod does not stop root), and an
unexpected error inside a shard: exit 1, one line on stderr and no traceback, nothing committed
half-way, no temporary files; after space is freed the same command resumes and the arrays are
byte-identical to an uninterrupted run. Mounting needs root: the tests skip, saying so, elsewhere.
"""

from __future__ import annotations

import errno
import io
import json
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

import featcache
from featcache.cli import main
from featcache.errors import FeatcacheError, StorageError, UsageError
from featcache.extract.config import from_dict
from featcache.extract.finalize import write_run_record
from featcache.extract.plan import prepare
from featcache.retry import is_transient, storage_error
from featcache.store.cache import Cache
from featcache.pipelines.extract import run
from tests.test_extract.test_faults import _commits, _tree

pytestmark = pytest.mark.usefixtures("ray_runtime")  # the in-process jobs share one embedded Ray
KEY = "dinov3@512"  # 32x32 cells x 32 channels in f32: 128 KiB per image, so a shard dwarfs the metadata
PAGE = 4096


def _job(out, source, teachers) -> dict:
    return {"source": str(source), "output": str(out), "shard_size": 2, "batch_size": 2, "stats": False,
            "teachers": [{"family": "dinov3", "source": teachers["dinov3"], "resolutions": [512], "codec": "f32"}]}


def _extract_args(job: dict) -> list[str]:
    t = job["teachers"][0]
    return ["extract", "--source", job["source"], "--out", job["output"], "--shard-size", "2", "--batch-size", "2",
            "--no-stats", "--teacher", f"family=dinov3,source={t['source']},resolutions=512,codec=f32"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, photos_dir, job_teachers) -> Path:
    out = tmp_path_factory.mktemp("storage_baseline") / "cache"
    assert run(from_dict(_job(out, photos_dir, job_teachers)), stream=io.StringIO()).exit_code == 0
    return out


@contextmanager
def _mounted(path: Path, options: str, source: str = "tmpfs", fstype: str | None = "tmpfs"):
    """Mount ``source`` on ``path`` (skip the test, with the reason, where mounting is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", *(["-t", fstype] if fstype else []), "-o", options, source, str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount ({' '.join(cmd)}): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def _pages(files) -> int:
    """Bytes a tmpfs charges for ``files`` (whole pages)."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files)


def _shard_files(root: Path, shard: int) -> list[Path]:
    view = root / "features.zarr" / KEY
    objects = [view / name / "c" / str(shard) for name in ("dense", "summary", "box", "valid")]
    files = [f for p in objects for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return files + [root / "_commits" / KEY / f"{shard}.json"]


def _cli(args: list[str], capfd) -> tuple[int, str]:
    code = main(args)
    return code, capfd.readouterr().err


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files of featcache's and zarr's atomic writes."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]


def _fill(mount: Path) -> None:
    """Take every free byte of ``mount``."""
    with open(mount / "ballast", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * PAGE)
        except OSError as e:
            assert e.errno == errno.ENOSPC


# ---- which errors are retried -------------------------------------------------------------


def test_only_connection_errors_and_timeouts_are_transient():
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    transient = [ConnectionResetError(), TimeoutError(), EndpointConnectionError(endpoint_url="http://x"),
                 ReadTimeoutError(endpoint_url="http://x"), aiohttp.ServerDisconnectedError(),
                 OSError(errno.EBUSY, "SlowDown")]
    lasting = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
               PermissionError(errno.EACCES, "Permission denied"), PermissionError("AccessDenied"),
               UsageError("bad"), FeatcacheError("bad"), RuntimeError("bug"), ValueError("bug"),
               IsADirectoryError(errno.EISDIR, "Is a directory")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in lasting] == [False] * len(lasting)


def test_a_storage_error_names_the_path_and_what_to_do():
    e = storage_error(OSError(errno.ENOSPC, "No space left on device"), "writing /x/features.zarr/v")
    assert isinstance(e, StorageError) and isinstance(e, OSError) and e.errno == errno.ENOSPC and e.exit_code == 1
    assert str(e) == "no space left on device writing /x/features.zarr/v: free space and rerun"
    rebuild, args = e.__reduce__()  # what Ray's serializer calls when the error crosses to the driver
    again = rebuild(*args)
    assert type(again) is StorageError and str(again) == str(e) and again.errno == errno.ENOSPC
    assert storage_error(ConnectionResetError(), "writing /x") is None
    assert storage_error(RuntimeError("bug"), "writing /x") is None


# ---- disk full ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_a_resume_after_freeing_space_is_byte_identical(
        tmp_path, capfd, photos_dir, job_teachers, baseline):
    setup = _pages([baseline / "manifest.parquet", *(baseline / "features.zarr").rglob("zarr.json")])
    shard = _pages(_shard_files(baseline, 0))
    with _mounted(tmp_path / "disk", f"size={setup + 2 * shard + shard // 2}") as disk:
        out = disk / "cache"
        job = _job(out, photos_dir, job_teachers)
        capfd.readouterr()
        code, err = _cli(_extract_args(job), capfd)
        last = _last_line(err)
        assert code == 1, err
        assert last.startswith("featcache: error: no space left on device writing") and str(out) in last, last
        assert "retrying" not in err
        assert [p.name for p in _commits(out)] == ["0.json", "1.json"]  # what fitted is committed, whole
        assert not _leftovers(disk)
        assert _cli(["verify", str(out)], capfd)[0] == 0
        record = json.loads(next((out / "runs").glob("*.json")).read_text())
        assert record["exit_code"] == 1 and "no space left on device" in record["stopped"]["error"]

        _remount(disk, "size=64m")  # the user frees space on the same disk
        code, err = _cli(_extract_args(job), capfd)
        assert code == 0, err
        assert "resuming: 2 of 5 shards already committed" in err
        assert not _leftovers(disk)
        assert featcache.verify(str(out)).ok
        assert [p.relative_to(out) for p in _commits(out)] == [p.relative_to(baseline) for p in _commits(baseline)]
        got, want = _tree(out), _tree(baseline)
        assert sorted(got) == sorted(want)
        assert [k for k in want if got[k] != want[k]] == []


@pytest.mark.slow
def test_a_run_record_on_a_full_disk_is_one_clear_error_and_leaves_no_temp_file(tmp_path, baseline):
    with _mounted(tmp_path / "disk", "size=1m") as disk:
        shutil.copytree(baseline, disk / "cache", ignore=shutil.ignore_patterns("features.zarr", "runs"))
        _fill(disk)
        with pytest.raises(StorageError, match=r"^no space left on device writing .*/runs/.*\.json: free space"):
            write_run_record(Cache.open(disk / "cache"), {"exit_code": 0})
        assert not _leftovers(disk) and not list((disk / "cache" / "runs").glob("*"))


@pytest.mark.slow
def test_a_job_whose_run_record_does_not_fit_either_says_so_in_its_one_line(tmp_path, capfd, photos_dir,
                                                                            job_teachers):
    with _mounted(tmp_path / "disk", "size=4m") as disk:
        job = _job(disk / "cache", photos_dir, job_teachers)
        prepare(from_dict(job))
        _fill(disk)
        capfd.readouterr()
        code, err = _cli(_extract_args(job), capfd)
        last = _last_line(err)
        assert code == 1, err
        assert last.startswith("featcache: error: no space left on device writing shard 0 of dinov3@512"), last
        assert "; the run record could not be written either (no space left on device writing " in last, last
        assert not _leftovers(disk) and not list((disk / "cache" / "runs").glob("*"))


# ---- read-only output ---------------------------------------------------------------------


@pytest.mark.slow
def test_read_only_features_stop_the_job_at_once_without_retries(tmp_path, capfd, photos_dir, job_teachers):
    with _mounted(tmp_path / "disk", "size=64m") as disk:
        out = disk / "cache"
        job = _job(out, photos_dir, job_teachers)
        prepare(from_dict(job))  # the views exist; then the features become read-only
        features = out / "features.zarr"
        with _mounted(features, "bind", source=str(features), fstype=None):
            _remount(features, "bind,ro")
            capfd.readouterr()
            code, err = _cli([*_extract_args(job), "--cpu-workers", "2"], capfd)  # two shards in flight
        last = _last_line(err)
        assert code == 1, err
        assert re.match(r"featcache: error: read-only file system writing shard [02] of dinov3@512 to "
                        r".*: write to a writable location, or remount it read-write \(committed shards are kept\)$",
                        last), last
        assert "retrying" not in err and "attempt" not in err
        assert _commits(out) == [] and not _leftovers(disk)
        record = json.loads(next((out / "runs").glob("*.json")).read_text())
        assert re.search(r"^stopping: shard [02] failed \(StorageError: read-only file system .*\); waiting for 1 "
                         r"shard in flight$", err, re.M), err
        assert record["stopped"]["shard"] in (0, 2) and sorted(record["shards"]["failed"]) == ["0", "2"]
        assert record["stopped"]["not_started"] == [1, 3, 4] and record["shards"]["processed"] == 0


# ---- index and stats ----------------------------------------------------------------------


@pytest.mark.slow
def test_index_into_a_read_only_or_full_location_is_one_line(tmp_path, capfd, photos_dir):
    with _mounted(tmp_path / "ro", "size=1m,ro") as ro:
        code, err = _cli(["index", str(photos_dir), "--out", str(ro / "cache")], capfd)
        assert code == 1 and _last_line(err).startswith("featcache: error: read-only file system"), err
    with _mounted(tmp_path / "full", "size=1m") as full:
        (full / "cache").mkdir()
        _fill(full)
        code, err = _cli(["index", str(photos_dir), "--out", str(full / "cache")], capfd)
        last = _last_line(err)
        assert code == 1 and last.startswith("featcache: error: no space left on device writing"), err
        assert str(full / "cache" / "errors.parquet") in last  # written first (even empty): the manifest comes last
        assert not _leftovers(full) and list((full / "cache").iterdir()) == []


@pytest.mark.slow
def test_stats_on_a_full_disk_is_one_line(tmp_path, capfd, baseline):
    with _mounted(tmp_path / "disk", "size=8m") as disk:
        shutil.copytree(baseline, disk / "cache")
        _fill(disk)
        code, err = _cli(["stats", str(disk / "cache")], capfd)
        last = _last_line(err)
        assert code == 1 and last.startswith("featcache: error: no space left on device writing"), err
        assert not _leftovers(disk)


# ---- an unexpected error inside a shard ---------------------------------------------------


def _tamper_channels(out: Path, channels: int) -> None:
    """Edit the dense array's metadata to another channel count than the view's attrs say: a
    consistent zarr array that no shard of this view fits into."""
    meta = out / "features.zarr" / KEY / "dense" / "zarr.json"
    d = json.loads(meta.read_text())
    d["shape"][-1] = channels
    d["chunk_grid"]["configuration"]["chunk_shape"][-1] = channels
    d["codecs"][0]["configuration"]["chunk_shape"][-1] = channels
    meta.write_text(json.dumps(d))


@pytest.mark.slow
def test_an_unexpected_error_in_a_shard_is_not_retried_and_its_traceback_is_in_the_run_record(
        tmp_path, capfd, photos_dir, job_teachers):
    out = tmp_path / "cache"
    job = _job(out, photos_dir, job_teachers)
    prepare(from_dict(job))
    _tamper_channels(out, 64)
    capfd.readouterr()
    code, err = _cli(_extract_args(job), capfd)
    last = _last_line(err)
    assert code == 1, err
    assert "retrying" not in err and "attempt" not in err
    records = list((out / "runs").glob("*.json"))
    assert last.startswith("featcache: error: shard 0 of dinov3@512 failed: ValueError: "), last
    assert last.endswith(f"(not retried; traceback in {records[0]})"), last
    stopped = json.loads(records[0].read_text())["stopped"]
    assert stopped["shard"] == 0 and stopped["error"].startswith("ValueError: ")
    assert "in write_shard" in stopped["traceback"] and "ValueError: could not broadcast" in stopped["traceback"]
    assert _commits(out) == []


@pytest.mark.slow
def test_a_featcache_error_in_a_shard_stops_the_job_with_its_message(tmp_path, capfd, photos_dir, job_teachers):
    out = tmp_path / "cache"
    job = _job(out, photos_dir, job_teachers)
    prepare(from_dict(job))
    meta = out / "features.zarr" / KEY / "dense" / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"int16"').replace('"fill_value": 0.0', '"fill_value": 0'))
    capfd.readouterr()
    code, err = _cli(_extract_args(job), capfd)
    last = _last_line(err)
    assert code == 1, err
    assert last.startswith("featcache: error: shard 0 of dinov3@512 failed: cannot store floats as int16"), last
    assert last.endswith("(not retried)") and "retrying" not in err
    assert _commits(out) == []
