"""Ray beside a cluster that ``ray start --head`` left running on this machine: with no
``--ray-address`` and no ``RAY_ADDRESS`` a job starts its own private Ray, says that it did not join
the running one, and leaves it running (checked on the README's demo, in tests/test_extract/test_demo.py,
which runs beside ``running_head``); a job that did not run shows no results."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.seaweed import free_ports
from tests.test_extract.test_cluster import RAY, stop_cluster

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


def test_demo_whose_job_did_not_run_shows_no_inspect_table(tmp_path):
    env = {**os.environ, "FEATCACHE_HOME": str(tmp_path / "home"), "RAY_ADDRESS": "not-an-address"}
    cli = str(Path(sys.executable).with_name("featcache"))
    proc = subprocess.run([cli, "demo", "--out", str(tmp_path / "demo-cache")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("featcache: error: cannot start or reach not-an-address: "
                                                    "Invalid address format: not-an-address")
    assert "shards 0/4" not in proc.stdout and "cache " not in proc.stdout, proc.stdout  # no table of a job not run
