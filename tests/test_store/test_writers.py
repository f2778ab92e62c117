"""Writers in separate processes: concurrent shards stay intact; a killed writer leaves no commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import featcache
from featcache.store import Cache
from tests.support.caches import make_cache, shard_data

REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent("""
    import sys, time
    from featcache.store import Cache
    from tests.support.caches import shard_data
    root, shards, go = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    view = Cache.open(root).view("dinov3@224")
    while not __import__("os").path.exists(go):
        time.sleep(0.005)
    for rep in range(3):
        for k in shards:
            view.write_shard(view.shard_range(k)[0], **shard_data(view, k, seed=rep))
""")

KILLED = textwrap.dedent("""
    import sys, time
    from featcache.store import Cache, commits, shardwriter
    from tests.support.caches import shard_data
    root, moment, ready = sys.argv[1:4]

    def signal_and_hang():
        open(ready, "w").close()
        time.sleep(600)

    if moment == "before-commit":
        commits.write_commit = lambda *a, **k: signal_and_hang()
    else:  # the shard's objects one at a time, the kill between two of them
        original = shardwriter.write_objects
        def write_then_hang(objects):
            checksums = []
            for loc, buffers in objects:
                checksums += original([(loc, buffers)])
                if f"/{moment.split('-')[1]}/c/" in loc.path:
                    signal_and_hang()
            return checksums
        shardwriter.write_objects = write_then_hang
    view = Cache.open(root).view("dinov3@224")
    view.write_shard(4, **shard_data(view, 1, seed=7))
""")


def _python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"writer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "writer never reached the kill point"
        time.sleep(0.01)


def test_two_processes_write_different_shards_at_once(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=32, shard_size=4, grid=(8, 8), channels=64)
    go = tmp_path / "go"
    procs = [_python(WRITER, root, "0,2,4,6", str(go)), _python(WRITER, root, "1,3,5,7", str(go))]
    time.sleep(1.0)  # both processes imported and waiting
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert featcache.verify(root).ok
    reader = Cache.open(root).view(view.key).reader(verify_checksums=True)
    for k in range(8):
        want = shard_data(view, k, seed=2)["dense"]
        for i in range(*view.shard_range(k)):
            np.testing.assert_array_equal(reader.read(i).dense, want[i - k * 4])


@pytest.mark.parametrize("moment", ["after-dense", "after-summary", "before-commit"])
@pytest.mark.parametrize("rewrite", [False, True], ids=["first-write", "rewrite"])
def test_writer_killed_mid_shard_leaves_no_commit(tmp_path, moment, rewrite):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=12, shard_size=4)
    view.write_shard(0, **shard_data(view, 0))
    if rewrite:
        view.write_shard(4, **shard_data(view, 1, seed=3))
    ready = tmp_path / "ready"
    proc = _python(KILLED, root, moment, str(ready))
    _wait_for(ready, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    assert view.committed_shards() == {0}
    report = featcache.verify(root)
    assert report.ok and any("shard 1" in n for n in report.notes)
    assert not any(view.reader().read(i).valid for i in range(4, 8))

    view.write_shard(4, **shard_data(view, 1, seed=7))
    report = featcache.verify(root)
    assert report.ok and report.shards_checked == 2 and not report.notes
    np.testing.assert_array_equal(view.reader().read(5).dense, shard_data(view, 1, seed=7)["dense"][1])


def test_two_run_records_in_the_same_second_keep_both(tmp_path):
    """Two jobs of one process that end within a second wrote the same runs/<second>-<pid>.json: the
    second record replaced the first."""
    from featcache.extract.finalize import write_run_record
    from tests.support.caches import write_manifest

    write_manifest(str(tmp_path / "c"), 4)
    cache = Cache.open(str(tmp_path / "c"))
    uris = [write_run_record(cache, {"exit_code": n}) for n in range(3)]
    assert len(set(uris)) == 3
    records = sorted(json.loads(p.read_text())["exit_code"] for p in (tmp_path / "c" / "runs").glob("*.json"))
    assert records == [0, 1, 2]
