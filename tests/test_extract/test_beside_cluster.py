"""Ray beside a cluster that ``ray start --head`` left running on this machine: with no
``--ray-address`` and no ``RAY_ADDRESS`` a job starts its own private Ray, says that it did not join
the running one, and leaves it running; a job that did not run shows no results."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

import featcache
from tests.support.seaweed import free_ports
from tests.test_extract.test_cluster import RAY, _cluster_processes, stop_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def running_head():
    """(address, environment): a one-CPU ``ray start --head`` on loopback. Its temp dir (RAY_TMPDIR) is
    its own, so only processes given this environment find it as "the cluster on this machine", and
    only its processes are stopped afterwards (``ray stop`` would stop every Ray on the machine)."""
    tmp = f"/tmp/fcr-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0")
    port = free_ports(1)[0]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"],
                       check=True, capture_output=True, timeout=120, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(tmp)


def test_demo_beside_a_running_cluster_starts_its_own_ray(running_head, tmp_path):
    address, env = running_head
    head = _cluster_processes(env["RAY_TMPDIR"])
    assert head
    current = (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text().strip()
    assert current.endswith(address.split(":")[1])  # what ray.init() with no address would join (Ray's own IP)
    env = {**env, "FEATCACHE_HOME": str(tmp_path / "home")}
    out = tmp_path / "demo-cache"
    cli = str(Path(sys.executable).with_name("featcache"))
    proc = subprocess.run([cli, "demo", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"not joining the Ray cluster at {current}" in proc.stderr  # said, not done silently
    assert "extracted 26 images in 4 shards" in proc.stdout and "shards 4/4" in proc.stdout
    assert featcache.verify(str(out)).ok
    assert all(os.path.exists(f"/proc/{pid}") for pid in head)  # the user's cluster still runs


def test_demo_whose_job_did_not_run_shows_no_inspect_table(tmp_path):
    env = {**os.environ, "FEATCACHE_HOME": str(tmp_path / "home"), "RAY_ADDRESS": "not-an-address"}
    cli = str(Path(sys.executable).with_name("featcache"))
    proc = subprocess.run([cli, "demo", "--out", str(tmp_path / "demo-cache")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("featcache: error: cannot start or reach not-an-address: "
                                                    "Invalid address format: not-an-address")
    assert "shards 0/4" not in proc.stdout and "cache " not in proc.stdout, proc.stdout  # no table of a job not run
