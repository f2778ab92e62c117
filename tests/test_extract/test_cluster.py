"""A two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``, one CPU
each): extract with ``--ray-address`` processes shards on both nodes and equals the embedded run;
with ``RAY_ADDRESS`` in the environment (as ``ray job submit`` sets it) it joins that cluster."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featcache
from tests.support.seaweed import free_ports
from tests.test_extract.conftest import stored

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _cluster_processes(temp_dir: str) -> list[int]:
    """Every process of the cluster: its command line names the cluster's own temp dir, or it is a
    child of one that does (Ray's worker processes)."""
    from tests.support.processes import descendants

    roots = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    roots.append(int(name))
        except (OSError, ValueError):
            continue
    return sorted({p for r in roots for p in [r, *descendants(r)]})


@pytest.fixture
def embedded(two_image_shards):
    """The same job on the embedded Ray (in this process: the tests' shared embedded runtime, a
    private one that the cluster's nodes never join); the session's, shared with test_faults."""
    return two_image_shards


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """(address, environment for processes that join it), one cluster for this module's tests (each
    start costs ~8 s; a job's workers end with it). The cluster has its own auth token; only
    subprocesses see it (Ray keeps the token of its first session for the life of a process)."""
    temp_dir = f"/tmp/featcache-ray-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    token = tmp_path_factory.mktemp("cluster") / "ray-token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_ports(1)[0]
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", temp_dir, *common], check=True, capture_output=True, timeout=120, env=env)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], check=True, capture_output=True,
                       timeout=120, env=env)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(temp_dir)


def stop_cluster(temp_dir: str) -> None:
    """Kill the processes of the Ray cluster whose temp dir is ``temp_dir`` (only those: ``ray stop``
    would stop every Ray on the machine) and remove the folder."""
    for pid in _cluster_processes(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["rm", "-rf", temp_dir])


def test_two_node_cluster_equals_the_embedded_run(embedded, two_node_cluster, tmp_path, photos_dir, job_teachers):
    address, env = two_node_cluster

    clustered = tmp_path / "clustered"
    config = tmp_path / "job.toml"
    teachers = "\n".join(f'[[teachers]]\nfamily = "{f}"\nsource = "{job_teachers[f]}"\ncodec = "f32"\n' + extra
                         for f, extra in (("siglip2", ""), ("dinov3", "resolutions = [64, 96]\n"),
                                          ("sam3", "mosaic = 2\n")))
    config.write_text(f'source = "{photos_dir}"\noutput = "{clustered}"\nshard_size = 2\nbatch_size = 2\n'
                      f'cpu_workers = 2\n\n{teachers}')
    proc = subprocess.run([sys.executable, "-c", "import sys; from featcache.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "extract", str(config), "--ray-address", address],
                          capture_output=True, text=True, env=env, timeout=600)
    err = proc.stderr
    assert proc.returncode == 0, err
    assert "2 workers (cpu, 1 torch thread each) on 2 nodes" in err
    assert featcache.verify(str(clustered)).ok
    cache = featcache.open_cache(str(clustered))
    nodes = {cache.view("dinov3@64").commit_record(s).info["node"] for s in range(5)}
    assert len(nodes) == 2  # shards were committed by workers on both nodes
    for key in ("siglip2@64", "dinov3@64", "dinov3@96", "sam3-mosaic2@56"):
        a, b = stored(embedded, key), stored(clustered, key)
        assert all(np.array_equal(a[n], b[n]) for n in a), key


def _featcache(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``featcache ARGS`` in a subprocess with ``env``."""
    return subprocess.run([sys.executable, "-m", "featcache.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_ray_address_in_the_environment_joins_that_cluster(two_node_cluster, tmp_path, photos_dir, job_teachers):
    address, env = two_node_cluster
    out = tmp_path / "joined"
    proc = _featcache("extract", "--source", str(photos_dir), "--out", str(out), "--teacher",
                      f"family=dinov3,source={job_teachers['dinov3']}", "--shard-size", "2", "--cpu-workers", "2",
                      "--no-stats", env={**env, "RAY_ADDRESS": address})
    err = proc.stderr
    assert proc.returncode == 0, err
    said = [err.index(text) for text in (f"joining the Ray cluster at {address} (RAY_ADDRESS)",
                                         "loading teachers on 2 workers", "2 workers (cpu, 1 torch thread each) on 2 nodes")]
    assert said == sorted(said), err  # in the order things happen
    cache = featcache.open_cache(str(out))
    view = cache.view(next(iter(cache.views)))
    nodes = {view.commit_record(s).info["node"] for s in range(5)}
    assert len(nodes) == 2  # the cluster's two nodes wrote the shards, not an embedded one-node Ray
    (record,) = (out / "runs").glob("*.json")
    assert json.loads(record.read_text())["config"]["ray_address"] == address  # the cluster it joined
