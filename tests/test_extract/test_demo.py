"""The README's main command: ``featcache demo`` extracts the scikit-image photos with tiny offline
teachers of the three families on an embedded Ray, then inspects the cache; a second run resumes. It runs
beside a cluster that ``ray start --head`` left on this machine (tests/test_extract/test_beside_cluster.py):
with no ``--ray-address`` and no ``RAY_ADDRESS`` the demo starts its own private Ray, says that it did not
join the running one, and leaves it running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import featcache
from tests.test_extract.test_beside_cluster import running_head  # noqa: F401 (a fixture)
from tests.test_extract.test_cluster import _cluster_processes

pytestmark = pytest.mark.slow


def test_demo_runs_a_real_extraction_beside_a_running_cluster_and_resumes(running_head, tmp_path):  # noqa: F811
    address, env = running_head
    head = _cluster_processes(env["RAY_TMPDIR"])
    assert head
    current = (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text().strip()
    assert current.endswith(address.split(":")[1])  # what ray.init() with no address would join (Ray's own IP)
    env = {**env, "FEATCACHE_HOME": str(tmp_path / "home")}  # demo teachers saved here, not in ~
    cli = str(Path(sys.executable).with_name("featcache"))
    out = tmp_path / "demo-cache"
    first = subprocess.run([cli, "demo", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    for noise in ("SIGTERM", "Traceback", "token authentication", "WARNING"):  # Ray's shutdown dump, warnings
        assert noise not in first.stderr + first.stdout, first.stderr
    assert f"not joining the Ray cluster at {current}" in first.stderr  # said, not done silently
    assert "extracted 26 images in 4 shards (0 already committed)" in first.stdout and "shards 4/4" in first.stdout
    for key in ("siglip2@64", "dinov3@64", "dinov3@128", "sam3-mosaic2@56"):
        assert key in first.stdout and key in first.stderr  # the inspect table and the stats table
    assert sorted(p.name for p in (tmp_path / "home" / "demo-teachers").iterdir()) == ["dinov3", "sam3", "siglip2"]
    assert featcache.verify(str(out)).ok
    cache = featcache.open_cache(str(out))
    assert cache.num_images == 26 and all(v.stats["frozen"] for v in cache.views.values())
    assert all(os.path.exists(f"/proc/{pid}") for pid in head)  # the user's cluster still runs
    second = subprocess.run([cli, "demo", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and "extracted 0 images in 0 shards (4 already committed)" in second.stdout
    assert "resuming: 4 of 4 shards already committed in every view, 0 to do" in second.stderr
