"""Statistics are published atomically: a ``stats --recompute`` killed at any step leaves the old or the
new statistics, complete, and PHI-S reads keep working (issue 10, defect 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featcache
from featcache.cli import main
from featcache.errors import CacheFormatError
from featcache.stats import compute
from featcache.store.statsio import read_stats, stats_digest
from tests.support.caches import make_cache, write_all

KEY = "dinov3@224"
REPO = Path(__file__).resolve().parents[2]

# In a child process: recompute with other settings and die (os._exit, as kill -9 would) at one step.
_CHILD = """
import os, sys
import featcache
from featcache.stats import compute
step = sys.argv[2]
die = lambda *a, **k: os._exit(9)
if step == "before arrays":
    compute._write_arrays = die
elif step == "during arrays":
    write, calls = compute._write_array, []
    def _write_array(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os._exit(9)
        write(*a, **k)
    compute._write_array = _write_array
elif step == "before attrs":
    compute._switch_attrs = die
elif step == "before cleanup":
    compute._remove_other_versions = die
compute.compute_view(featcache.open_cache(sys.argv[1]).view("%s"), seed=5, token_budget=100)
""" % KEY


pytestmark = pytest.mark.usefixtures("ray_runtime")  # its jobs run on the shared embedded Ray


@pytest.fixture(scope="module")
def with_stats(tmp_path_factory):
    """A cache with statistics (seed 0, all tokens), and the hash a recompute with seed 5 gives."""
    base = tmp_path_factory.mktemp("publish")
    root = str(base / "cache")
    _, view = make_cache(root, n=12, shard_size=4, grid=(4, 6), channels=24, dtype="float32")
    write_all(view, seed=1)
    old = compute.compute_view(featcache.open_cache(root).view(KEY))
    assert old is not None
    probe = str(base / "probe")
    shutil.copytree(root, probe)
    compute.compute_view(featcache.open_cache(probe).view(KEY), seed=5, token_budget=100)
    return root, featcache.open_cache(root).view(KEY).stats["hash"], featcache.open_cache(probe).view(KEY).stats["hash"]


def _check_complete(root: str) -> str:
    view = featcache.open_cache(root).view(KEY)
    arrays = read_stats(view)
    assert stats_digest(arrays) == view.stats["hash"]
    with view.reader() as r:
        y = r.read_dense(0, space="phis")
    x = r.read_dense(0).astype(np.float64)
    expected = (x - arrays["mean"]) @ arrays["rotation"].astype(np.float64).T
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert featcache.verify(root).ok
    return view.stats["hash"]


@pytest.mark.parametrize("step,survivor", [("before arrays", "old"), ("during arrays", "old"),
                                           ("before attrs", "old"), ("before cleanup", "new")])
def test_killed_recompute_leaves_old_or_new_statistics_complete(with_stats, tmp_path, step, survivor):
    root, old, new = with_stats
    copy = str(tmp_path / "c")
    shutil.copytree(root, copy)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, copy, step], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert _check_complete(copy) == {"old": old, "new": new}[survivor]
    compute.compute_view(featcache.open_cache(copy).view(KEY), seed=5, token_budget=100)  # a rerun finishes it
    assert _check_complete(copy) == new
    versions = [p.name for p in (Path(copy) / "features.zarr" / KEY / "stats").iterdir() if p.is_dir()]
    assert versions == [new.split(":")[1][:16]]  # older versions removed once the new one is published


def test_attrs_naming_missing_statistics_are_a_problem_not_a_keyerror(with_stats, tmp_path, capsys):
    root, old, _ = with_stats
    copy = str(tmp_path / "c")
    shutil.copytree(root, copy)
    view = featcache.open_cache(copy).view(KEY)
    shutil.rmtree(Path(view.loc.path) / view.stats["path"])
    problems = featcache.verify(copy).problems
    assert [(p.kind, p.view) for p in problems] == [("stats", KEY)] and "is missing" in problems[0].message
    with view.reader() as r, pytest.raises(CacheFormatError, match="run 'featcache stats --recompute'"):
        r.read_dense(0, space="phis")
    assert main(["inspect", copy]) == 0
    assert main(["stats", copy, "--recompute"]) == 0
    assert _check_complete(copy) == old  # same settings as the first computation: same bytes again


def test_a_failed_publish_returns_after_every_write_it_started_has_ended(with_stats, tmp_path, monkeypatch):
    """Zarr writes a group's parents beside the group itself, all at once; when one of them fails
    (a full disk), the others were still running when the error reached the caller, so a
    ``<name>.<hex>.partial`` file could outlive the one-line error (CI: a full disk under
    ``featcache stats``). The error now comes back only once every write it started has ended."""
    import asyncio
    import errno

    import zarr.storage

    root = str(tmp_path / "cache")
    shutil.copytree(with_stats[0], root)
    ended: list[str] = []
    real_set = zarr.storage.LocalStore._set

    async def _set(self, key, value, exclusive=False):
        if key.endswith("zarr.json") and "/stats/" in key and not exclusive:
            raise OSError(errno.ENOSPC, "No space left on device", key)  # the new version's own group
        if exclusive:
            await asyncio.sleep(0.3)  # a parent written alongside, slower than the failure
        try:
            await real_set(self, key, value, exclusive)  # parents that exist: FileExistsError, kept
        finally:
            ended.append(key)

    monkeypatch.setattr(zarr.storage.LocalStore, "_set", _set)
    with pytest.raises(OSError):
        compute.compute_view(featcache.open_cache(root).view(KEY), seed=5, token_budget=100)
    assert {"zarr.json", f"{KEY}/zarr.json", f"{KEY}/stats/zarr.json"} <= set(ended), ended  # all ended first
    assert not list(Path(root).rglob("*.partial"))
