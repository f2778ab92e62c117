"""A run folder on an object store (issue 26): ``featcache train --out s3://…`` on the SeaweedFS server writes the
config, checkpoints, metrics and pictures there; a run killed mid-way resumes from it with the losses an
uninterrupted run logs; an upload cut short never replaces ``last``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from featcache import checkpoint
from featcache.runs import Mirror, RunFolder
from featcache.cli import main
from featcache.train import load_student
from tests.test_train.test_loop import LOSS_KEYS, _losses, config_file  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def cache_root(training_cache) -> str:
    """The session's training cache (the one test_loop builds for itself; this module only reads it)."""
    return str(training_cache)


@pytest.fixture
def runs_url(s3_env) -> str:
    bucket = f"r{uuid.uuid4().hex[:16]}"
    s3_env.make_bucket(bucket)
    return f"s3://{bucket}/runs/r1"


def _remote_losses(fs, url: str) -> dict[int, dict]:
    records = [json.loads(line) for line in fs.cat_file(f"{url}/metrics.jsonl").decode().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in records if "lr" in r}


def test_a_run_on_s3_killed_mid_way_resumes_from_the_store_with_the_uninterrupted_losses(cache_root, config_file,
                                                                                         tmp_path, runs_url, s3_env,
                                                                                         capsys, whole_run):
    whole = whole_run  # the same config, uninterrupted, on local disk (the session's)
    fs = s3_env.filesystem()
    cli = [sys.executable, "-m", "featcache.cli", "train"]
    proc = subprocess.Popen([*cli, cache_root, "--config", str(config_file), "--out", runs_url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    pointer = f"{runs_url}/checkpoints/last/{checkpoint.POINTER}"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and not fs.exists(pointer):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    record = json.loads(fs.cat_file(pointer))
    assert 4 <= record["meta"]["step"] < 12  # the first checkpoint, uploaded whole before the kill
    assert all(fs.exists(f"{runs_url}/checkpoints/last/{record['set']}/{name}") for name in record["files"])
    assert fs.exists(f"{runs_url}/config.toml") and not (tmp_path / "s3:").exists()
    capsys.readouterr()
    code = main(["train", "--out", runs_url, "--resume"])  # here: the killed process was another
    resumed = capsys.readouterr()
    assert code == 0, resumed.err[-3000:]
    assert f"resuming {runs_url} at step " in resumed.err and f"into {runs_url}" in resumed.out
    ours, theirs = _losses(whole), _remote_losses(fs, runs_url)
    assert sorted(ours) == sorted(theirs) == list(range(1, 13))
    for step in ours:
        for k in LOSS_KEYS:
            assert theirs[step][k] == pytest.approx(ours[step][k], rel=1e-6, abs=1e-9), (step, k)
    pictures = sorted(p.name for p in (whole / "pictures").iterdir())
    assert pictures and sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{runs_url}/pictures")) == pictures
    kept = {p.split("/checkpoints/last/", 1)[1].split("/")[0] for p in fs.find(f"{runs_url}/checkpoints/last")}
    assert kept == {checkpoint.POINTER, json.loads(fs.cat_file(pointer))["set"]}  # the sets it replaced are removed
    assert main(["train", "--out", runs_url, "--resume"]) == 2
    assert f"{runs_url} already finished its 12 steps" in capsys.readouterr().err
    student = load_student(runs_url, "last")  # the student as a product, read from the store
    assert student.config["step"] == 12
    assert main(["export", runs_url, "--checkpoint", "last", "--out", str(tmp_path / "exported")]) == 0
    assert load_student(tmp_path / "exported").config["step"] == 12


def test_an_upload_cut_short_leaves_the_previous_checkpoint_current(runs_url, monkeypatch):
    with RunFolder.open(runs_url, remote=True) as folder:
        folder.start("seed = 1\n", open(os.devnull, "w"))

        def write(text):
            return lambda path: path.write_text(text)

        folder.save("last", {"a.txt": write("a1"), "b.txt": write("b1")}, step=4)
        real = Mirror.push

        def failing(self, path):
            if path.name == "b.txt":
                raise OSError("connection reset by peer")
            real(self, path)

        monkeypatch.setattr(Mirror, "push", failing)
        with pytest.raises(OSError):
            folder.save("last", {"a.txt": write("a2"), "b.txt": write("b2")}, step=8)
    monkeypatch.setattr(Mirror, "push", real)
    with RunFolder.open(runs_url, remote=True) as back:  # what a resume reads from the store
        found, meta = back.current("last")
        assert meta == {"step": 4}
        assert (found / "a.txt").read_text() == "a1" and (found / "b.txt").read_text() == "b1"
