"""The README's main command: ``featcache demo`` extracts the scikit-image photos with tiny offline
teachers of the three families on an embedded Ray, then inspects the cache; a second run resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import featcache

pytestmark = pytest.mark.slow


def test_demo_runs_a_real_extraction_and_resumes(tmp_path):
    env = {**os.environ, "FEATCACHE_HOME": str(tmp_path / "home")}  # demo teachers saved here, not in ~
    cli = str(Path(sys.executable).with_name("featcache"))
    out = tmp_path / "demo-cache"
    first = subprocess.run([cli, "demo", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    for noise in ("SIGTERM", "Traceback", "token authentication", "WARNING"):  # Ray's shutdown dump, warnings
        assert noise not in first.stderr + first.stdout, first.stderr
    assert "extracted 26 images in 4 shards (0 already committed)" in first.stdout
    for key in ("siglip2@64", "dinov3@64", "dinov3@128", "sam3-mosaic2@56"):
        assert key in first.stdout and key in first.stderr  # the inspect table and the stats table
    assert sorted(p.name for p in (tmp_path / "home" / "demo-teachers").iterdir()) == ["dinov3", "sam3", "siglip2"]
    assert featcache.verify(str(out)).ok
    cache = featcache.open_cache(str(out))
    assert cache.num_images == 26 and all(v.stats["frozen"] for v in cache.views.values())
    second = subprocess.run([cli, "demo", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and "extracted 0 images in 0 shards (4 already committed)" in second.stdout
    assert "resuming: 4 of 4 shards already committed in every view, 0 to do" in second.stderr
