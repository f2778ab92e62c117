"""FeatSharp checkpoints are atomic as a set (issue 23, item 21): a run SIGKILLed at any point of a
save resumes to the very weights of a run never stopped, and a reader (``extract``, ``eval``) only
ever sees a whole step; checkpoints of the first layout still load and resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from featcache import checkpoint
from featcache.errors import UsageError
from featcache.upsample import settings as settings_file, training
from featcache.upsample.checkpoint import current, describe_upsampler
from tests.test_upsample.conftest import interrupt_at, one_torch_thread, settings

STEPS = dict(steps=2, save_every=1)

#: runs in a fresh process; per kill point a forked child trains until the point, where it SIGKILLs
#: itself; the point is named by the step whose save it strikes and how far that save got: after
#: the k-th file or folder flushed to disk (the weights are the first, the set folder the fourth),
#: or after the pointer names the new set (old sets not yet removed)
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from featcache import checkpoint
    from featcache.upsample import training
    from transformers import DINOv3ViTModel  # noqa: F401  (imported once, before the forks: seconds)

    torch.set_num_threads(1)
    settings, base = training.Settings(**json.loads(sys.argv[1])), Path(sys.argv[2])
    write_set, fsync, remove = checkpoint.write_set, checkpoint._fsync, checkpoint._remove_others

    def child(step, where):
        armed = []
        def arm(folder, files, meta):
            armed.extend([True] if meta["step"] == step else [])
            return write_set(folder, files, meta)
        def flushed(path):
            fsync(path)
            armed.extend([path] if armed else [])
            if where == len(armed) - 1:
                os.kill(os.getpid(), signal.SIGKILL)
        def removing(folder, keep):
            if armed and where == "pointer":
                os.kill(os.getpid(), signal.SIGKILL)
            remove(folder, keep)
        checkpoint.write_set, checkpoint._fsync, checkpoint._remove_others = arm, flushed, removing
        training.train(settings, base / f"{step}-{where}")

    killed = {}
    for step, where in json.loads(sys.argv[3]):
        pid = os.fork()
        if pid == 0:
            child(step, where)
            os._exit(0)  # the point was never reached
        killed[f"{step}-{where}"] = os.waitpid(pid, 0)[1] == signal.SIGKILL
    print(json.dumps(killed))
""")

#: (step whose save is struck, how far it got) → the step a reader then finds (0: no checkpoint yet)
POINTS = {(1, 1): 0, (2, 1): 1, (2, 4): 1, (2, "pointer"): 2}


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(current(run) / "featsharp.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, patch_local_dir, photo_dir):
    out = tmp_path_factory.mktemp("straight") / "run"
    with one_torch_thread():
        training.train(settings(patch_local_dir, photo_dir, **STEPS), out)
    return out


def test_a_kill_at_any_point_of_a_save_leaves_a_whole_step_and_resumes_exactly(straight, patch_local_dir,
                                                                                 photo_dir, tmp_path):
    s = settings(patch_local_dir, photo_dir, **STEPS)
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(s.to_dict()), str(tmp_path), json.dumps(list(POINTS))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {f"{a}-{b}": True for a, b in POINTS}, done.stdout
    want = _weights(straight)
    for (step, where), found in POINTS.items():
        run = tmp_path / f"{step}-{where}"
        if found:  # what extract and eval would read now: one whole step, weights and state alike
            assert describe_upsampler(run).step == found, (step, where)
            assert checkpoint.metadata(current(run) / "state.safetensors")["step"] == str(found)
        if found == STEPS["steps"]:  # a finished run: refused, as every trainer's (featcache.runs)
            with pytest.raises(UsageError, match="already finished its 2 steps"):
                training.train(None, run, resume=True)
        else:
            training.train(None, run, resume=True)
        got = _weights(run)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (step, where)
        assert describe_upsampler(run).sha256 == describe_upsampler(straight).sha256
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert not (run / "featsharp.json").exists() and not (run / "state.safetensors").exists()


def _first_layout(run) -> None:
    """The folder as featcache wrote it before checkpoint sets: the files and train.json in the run folder itself."""
    where = current(run)
    for path in where.iterdir():
        shutil.move(path, run / path.name)
    shutil.rmtree(run / "checkpoints")
    (run / "train.json").write_text(json.dumps(settings_file.load(run / "config.toml").to_dict()))
    (run / "config.toml").unlink()


def test_a_checkpoint_of_the_first_layout_loads_resumes_and_moves_to_sets(straight, patch_local_dir, photo_dir,
                                                                          tmp_path, monkeypatch):
    old = tmp_path / "old"
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        training.train(settings(patch_local_dir, photo_dir, **STEPS), old)
    monkeypatch.undo()
    _first_layout(old)
    assert describe_upsampler(old).step == 1 and (old / "featsharp.json").is_file()
    training.train(None, old, resume=True)
    assert describe_upsampler(old).sha256 == describe_upsampler(straight).sha256
    assert not (old / "featsharp.json").exists() and checkpoint.read_set(old)[1] == {"step": 2}
