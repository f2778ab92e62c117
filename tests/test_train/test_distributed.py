"""Data-parallel training (issue 26): ``torchrun`` with gloo on the CPU trains the student a single process trains
with the same global batch, resumes a run killed at one rank with another number of processes, and only rank 0
writes the run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import checkpoint
from featcache.train import config, train
from featcache.train.data import BatchPlan
from featcache.train.student import _random_crop
from featcache.train.weights import checkpoint_files
from tests.support.processes import descendants
from tests.test_train.test_loop import LOSS_KEYS, _losses, _records, config_file  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
#: a run of 20 steps, a checkpoint every 4: the test config's MESA, DAMP, CPE crops and two resolutions, and half
#: of the block linears' weights pruned (each rank finds the same masks)
SETTINGS = [f"optim.steps={STEPS}", "checkpoint_every=4", 'prune="unstructured:0.5"']


@pytest.fixture(scope="module")
def cache_root(training_cache) -> str:
    """The session's training cache (the one test_loop builds for itself; this module only reads it)."""
    return str(training_cache)


def test_the_ranks_shares_of_a_batch_are_the_global_batch():
    rows = np.arange(10, 40)
    whole = BatchPlan(rows, 6, 5, [64, 96], [128], 0.3)
    for step in (0, 4, 9):  # 9: the batch crosses an epoch
        parts = [BatchPlan(rows, 6, 5, [64, 96], [128], 0.3, share=(2 * r, 2 * r + 2)).batch(step) for r in range(3)]
        assert sum(parts, []) == whole.batch(step)


def test_a_rank_draws_its_rows_of_the_global_batch_s_cpe_crops():
    table = torch.randn(1, 8, 16, 16)
    torch.manual_seed(1)
    whole = _random_crop(table, (6, 6), 4)
    parts = []
    for first in (0, 2):
        torch.manual_seed(1)
        parts.append(_random_crop(table, (6, 6), 2, share=(first, 4)))
    assert torch.equal(torch.cat(parts), whole)



@pytest.fixture(scope="module")
def one_process(cache_root, config_file, tmp_path_factory) -> Path:
    """The single-process run every data-parallel one is compared with."""
    run = tmp_path_factory.mktemp("one") / "run"
    train(config.load(config_file, cache=cache_root, overrides=SETTINGS), run)
    return run


def _torchrun(n: int, audit: Path, run: Path, *args: str) -> subprocess.Popen:
    """``featcache train`` in ``n`` processes under torchrun (gloo), each recording its writes under ``run``
    into ``audit/rank-R.txt`` (:mod:`tests.support.write_audit`)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                             "-m", "tests.support.write_audit", str(run), str(audit), "train", *args],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _same_losses(a: Path, b: Path) -> None:
    ours, theirs = _losses(a), _losses(b)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in ours:
        for k in LOSS_KEYS:
            assert theirs[step][k] == pytest.approx(ours[step][k], rel=1e-5, abs=1e-7), (step, k)


@pytest.mark.slow
def test_two_processes_log_the_one_process_losses_and_rank_0_alone_writes(one_process, cache_root, config_file,
                                                                           tmp_path):
    run = tmp_path / "two"
    proc = _torchrun(2, tmp_path / "audit", run, cache_root, "--config", str(config_file), "--out", str(run),
                     *sum((["--set", s] for s in SETTINGS), []))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    _same_losses(one_process, run)
    steps = [r["step"] for r in _records(run) if "lr" in r]
    assert steps == sorted(set(steps)), "a step logged twice"
    assert [r["grad_norm"] for r in _records(run) if "lr" in r] == pytest.approx(
        [r["grad_norm"] for r in _records(one_process) if "lr" in r], rel=1e-5)
    assert checkpoint.metadata(checkpoint_files(run, "last")[1])["step"] == str(STEPS)
    written = (tmp_path / "audit" / "rank-0.txt").read_text().splitlines()
    assert any("checkpoints" in w for w in written) and any(w.endswith("metrics.jsonl") for w in written)
    assert (tmp_path / "audit" / "rank-1.txt").read_text() == "", "rank 1 changed the run folder"
    assert err.count(f"step {STEPS}/{STEPS}") == 1 and out.count("trained ") == 1  # one console: rank 0's


@pytest.mark.slow
def test_a_run_killed_at_one_of_two_ranks_resumes_in_one_process_with_the_same_losses(one_process, cache_root,
                                                                                       config_file, tmp_path):
    run = tmp_path / "killed"
    proc = _torchrun(2, tmp_path / "audit", run, cache_root, "--config", str(config_file), "--out", str(run),
                     *sum((["--set", s] for s in SETTINGS), []))
    pointer = run / "checkpoints" / "last" / checkpoint.POINTER
    deadline = time.monotonic() + 180
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = {pid: _rank(pid) for pid in descendants(proc.pid)}
    victim = [pid for pid, rank in ranks.items() if rank == "1"]
    assert len(victim) == 1, ranks
    os.kill(victim[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    logged = max(_losses(run))
    assert 4 <= logged < STEPS, logged  # it died mid-run, after the first checkpoint
    resumed = subprocess.run([sys.executable, "-m", "featcache.cli", "train", "--out", str(run), "--resume"],
                             capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    _same_losses(one_process, run)


def _rank(pid: int) -> str | None:
    """The RANK in a process's environment (torchrun's workers have one; the agent has none)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return env.get(b"RANK", b"").decode() or None


def test_a_batch_that_does_not_split_over_the_processes_is_refused_in_one_line():
    from featcache.errors import UsageError
    from featcache.train.distributed import Ranks

    assert Ranks(1, 2).share(6) == (3, 6)
    with pytest.raises(UsageError, match="optim.batch_size 3 does not split over 2 processes: use a multiple of 2"):
        Ranks(0, 2).share(3)


@pytest.mark.slow
def test_two_ray_train_workers_log_the_one_process_losses_through_a_lost_worker_and_a_resume(
        one_process, cache_root, config_file, tmp_path, ray_runtime):
    """2 Ray Train workers (the shared embedded Ray) until one is killed after the first checkpoint: one line; the
    run resumed on 2 workers finishes; its 20 steps log the single process's losses."""
    from featcache.pipelines import train as ray_train

    run = tmp_path / "lost"
    pointer = run / "checkpoints" / "last" / checkpoint.POINTER
    killed = []

    def kill_a_worker():
        deadline = time.monotonic() + 120
        while not pointer.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [pid for pid, title in descendants(1).items() if "RayTrainWorker" in title]
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    with pytest.raises(ray_train.TrainingStopped) as stopped:
        ray_train.run(config.load(config_file, cache=cache_root, overrides=SETTINGS), run, workers=2)
    killer.join()
    assert killed
    message = str(stopped.value)
    assert "\n" not in message and message.endswith(f"continue with 'featcache train --out {run} --resume'")
    assert 4 <= max(_losses(run)) < STEPS
    result = ray_train.run(None, run, resume=True, workers=2)
    _same_losses(one_process, run)
    assert result.steps == STEPS and result.heldout == pytest.approx(
        {k: v for k, v in _records(one_process)[-1].items() if k.startswith("heldout/")}, rel=1e-4)
