"""Faults: a worker killed with SIGKILL mid-job (at several moments), and a killed driver rerun.

Each time the final cache must pass verify and be byte-identical to an uninterrupted run: the same
objects with the same bytes in features.zarr, one commit per (view, shard), every row valid.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import featcache
from featcache.pipelines.extract import run
from featcache.store import attrs as attrs_json
from tests.support.processes import descendants, kill_all, wait_for
from tests.test_extract.conftest import three_family_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_runtime")]  # the in-process jobs: one shared Ray
SHARDS = 5  # 10 photos, 2 per shard


def _job(out, source, teachers):
    """The job of the session's ``two_image_shards`` cache."""
    return three_family_job(out, source, teachers, shard_size=2, batch_size=2)


@pytest.fixture
def baseline(two_image_shards):
    """The uninterrupted run of :func:`_job` (the session's, shared with test_cluster)."""
    return two_image_shards


def _tree(root: Path) -> dict[str, bytes]:
    """Every object of features.zarr; from the metadata, the time each view was created is left out
    (and the root's consolidated copy of the views' metadata, which holds those times too)."""
    base = root / "features.zarr"
    tree = {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}
    for key in [k for k in tree if k.endswith("zarr.json")]:
        meta = json.loads(tree[key])
        if "featcache" in meta.get("attributes", {}):
            meta["attributes"]["featcache"] = {k: v for k, v in attrs_json.read(meta["attributes"]).items()
                                               if k != "created"}
        meta.pop("consolidated_metadata", None)
        tree[key] = json.dumps(meta, sort_keys=True).encode()
    return tree


def _commits(root: Path) -> list[Path]:
    return sorted((root / "_commits").glob("*/*.json"))


def _assert_same_as_baseline(out: Path, baseline: Path) -> None:
    assert featcache.verify(str(out)).ok
    assert [p.relative_to(out) for p in _commits(out)] == [p.relative_to(baseline) for p in _commits(baseline)]
    assert len(_commits(out)) == 4 * SHARDS
    got, want = _tree(out), _tree(baseline)
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k] != want[k]]
    assert not different, different[:5]


def _start_driver(tmp_path: Path, out: Path, source, teachers) -> subprocess.Popen:
    config = _job(out, source, teachers).to_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    script = "import sys; from featcache.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", script, "extract", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class _JobThread(threading.Thread):
    """The job run in this process, on the shared runtime, from a thread: its workers are
    processes below this one, to be found and killed while the test waits."""

    def __init__(self, job):
        super().__init__(daemon=True)
        self.job, self.log, self.result, self.error = job, io.StringIO(), None, None

    def run(self):
        try:
            self.result = run(self.job, stream=self.log)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _actor_pids(root: int, running: bool = False) -> list[int]:
    """The extract workers below ``root`` (``running``: only those running a shard now)."""
    prefix = "ray::ExtractActor.process" if running else "ray::ExtractActor"
    return [pid for pid, title in descendants(root).items() if title.startswith(prefix)]


@pytest.mark.parametrize("moment", ["before the first commit", "right after the first commit",
                                    "just after the second commit"])
def test_worker_killed_mid_job(moment, tmp_path, photos_dir, job_teachers, baseline):
    out = tmp_path / "cache"
    job = _JobThread(_job(out, photos_dir, job_teachers))
    job.start()
    if moment == "before the first commit":
        wait_for(lambda: _actor_pids(os.getpid(), running=True), 120, what="a worker running a shard")
    else:
        need = 1 if moment == "right after the first commit" else 2
        wait_for(lambda: len(_commits(out)) >= need, 120, what=f"{need} commits")
        if need == 2:
            time.sleep(0.05)  # a moment later than the commit, not so late that the job (20 commits) ended
    victims = _actor_pids(os.getpid())
    assert victims, "no worker process found"
    committed_before = len(_commits(out))
    kill_all(victims)
    job.join(timeout=300)
    assert not job.is_alive() and job.error is None, job.error
    assert job.result.exit_code == 0, job.log.getvalue()
    assert committed_before < 4 * SHARDS  # the kill really happened mid-job
    assert "attempt 1 failed (worker died" in job.log.getvalue()
    _assert_same_as_baseline(out, baseline)


def test_driver_killed_then_rerun(tmp_path, photos_dir, job_teachers, baseline):
    out = tmp_path / "cache"
    driver = _start_driver(tmp_path, out, photos_dir, job_teachers)
    try:
        wait_for(lambda: len(_commits(out)) >= 3, 120, what="3 commits")
        children = descendants(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_all(descendants(driver.pid))
    kill_all(children)  # the embedded Ray's processes, should any outlive their driver
    done = len(_commits(out))
    assert done < 4 * SHARDS
    log = io.StringIO()
    result = run(_job(out, photos_dir, job_teachers), stream=log)
    assert result.exit_code == 0 and result.skipped + result.processed == SHARDS
    if result.skipped:
        assert f"resuming: {result.skipped} of {SHARDS} shards already committed" in log.getvalue()
    _assert_same_as_baseline(out, baseline)


def test_a_shard_that_cannot_be_written_stops_the_job_unretried_and_a_rerun_finishes_it(tmp_path, photos_dir,
                                                                                       job_teachers):
    from featcache.errors import ShardFailedError
    from featcache.extract.config import from_dict

    out = tmp_path / "cache"
    job = from_dict({"source": str(photos_dir), "output": str(out), "shard_size": 4, "max_retries": 1,
                     "teachers": [{"family": "dinov3", "source": job_teachers["dinov3"]}]})
    featcache.index(str(photos_dir), str(out))
    blocker = out / "features.zarr" / "dinov3@64" / "dense" / "c" / "1" / "0" / "0" / "0"
    blocker.mkdir(parents=True)  # a directory where shard 1's object must go: every write of it fails
    log = io.StringIO()
    with pytest.raises(ShardFailedError, match=r"^shard 1 of dinov3@64 failed: IsADirectoryError: .*"
                                               r"\(not retried; traceback in .*/runs/.*\.json\)$"):
        run(job, stream=log)  # not transient: retrying would fail the same way
    assert "retrying" not in log.getvalue()
    assert sorted(p.name for p in (out / "_commits" / "dinov3@64").iterdir()) == ["0.json"]
    assert featcache.verify(str(out)).ok  # the failed shard is simply not there for readers
    blocker.rmdir()
    log = io.StringIO()
    again = run(job, stream=log)
    assert again.exit_code == 0 and again.skipped == 1 and again.processed == 2
    assert "resuming: 1 of 3 shards already committed in every view, 2 to do" in log.getvalue()
