"""Checkpoint sets (``featcache.checkpoint.write_set``/``read_set``): a reader sees the old set or the
new one whole, whether the writer fails part-way or is killed between two files."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featcache import checkpoint


def _writer(text: str):
    return lambda path: path.write_text(text)


def _fail(path: Path) -> None:
    path.write_text("half")
    raise OSError(28, "No space left on device")


def _contents(found) -> dict[str, str]:
    path, _ = found
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def test_a_folder_without_a_set_has_none(tmp_path):
    assert checkpoint.read_set(tmp_path) is None
    assert checkpoint.read_set(tmp_path / "absent") is None


def test_the_newest_set_is_read_back_with_its_meta_and_older_sets_go(tmp_path):
    checkpoint.write_set(tmp_path, {"a": _writer("a1"), "b": _writer("b1")}, {"step": 1})
    checkpoint.write_set(tmp_path, {"a": _writer("a2"), "b": _writer("b2")}, {"step": 2})
    found = checkpoint.read_set(tmp_path)
    assert found[1] == {"step": 2} and _contents(found) == {"a": "a2", "b": "b2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([found[0].name, "current.json"])


def test_a_write_that_fails_on_the_second_file_leaves_the_old_set(tmp_path):
    checkpoint.write_set(tmp_path, {"a": _writer("a1"), "b": _writer("b1")}, {"step": 1})
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_set(tmp_path, {"a": _writer("a2"), "b": _fail}, {"step": 2})
    found = checkpoint.read_set(tmp_path)
    assert found[1] == {"step": 1} and _contents(found) == {"a": "a1", "b": "b1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([found[0].name, "current.json"])


def test_a_kill_between_two_files_leaves_the_old_set_and_the_next_write_recovers(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from featcache import checkpoint\n"
        "folder = Path(sys.argv[1])\n"
        "checkpoint.write_set(folder, {'a': lambda p: p.write_text('a1'), 'b': lambda p: p.write_text('b1')}, {'step': 1})\n"
        "def die(p):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.write_set(folder, {'a': lambda p: p.write_text('a2'), 'b': die}, {'step': 2})\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    found = checkpoint.read_set(tmp_path)
    assert found[1] == {"step": 1} and _contents(found) == {"a": "a1", "b": "b1"}
    assert len(list(tmp_path.glob("set-*"))) == 2  # the killed writer's half set, pointed at by nothing
    checkpoint.write_set(tmp_path, {"a": _writer("a3"), "b": _writer("b3")}, {"step": 3})
    found = checkpoint.read_set(tmp_path)
    assert found[1] == {"step": 3} and _contents(found) == {"a": "a3", "b": "b3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([found[0].name, "current.json"])


def test_a_damaged_pointer_is_one_line(tmp_path):
    from featcache.errors import UsageError

    checkpoint.write_set(tmp_path, {"a": _writer("a1")}, {"step": 1})
    (tmp_path / "current.json").write_text('{"set": "set-00')
    with pytest.raises(UsageError, match="current.json is damaged"):
        checkpoint.read_set(tmp_path)


# ---- the RNG state both trainers save (CPU generator + the training device's CUDA generator) -------------

def test_on_the_cpu_the_rng_state_is_the_cpu_generator_and_restoring_it_repeats_the_draws():
    state = checkpoint.rng_tensors(torch.device("cpu"))
    assert set(state) == {"rng.torch"} and state["rng.torch"].dtype == torch.uint8
    first = torch.rand(8)
    torch.rand(3)  # the generator moves on...
    checkpoint.restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(8), first)  # ...and is put back


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_state_without_cuda_entries_restores_the_cpu_generator_on_any_device(device):
    """A CPU checkpoint resumed on a CUDA device: the CPU generator is restored, the CUDA one left as
    seeded (on this CPU machine the CUDA branch itself is never reached: nothing here touches CUDA)."""
    torch.manual_seed(3)
    state = {"rng.torch": torch.get_rng_state()}
    first = torch.rand(8)
    checkpoint.restore_rng(state, torch.device(device))
    assert torch.equal(torch.rand(8), first)


def test_cuda_entries_are_ignored_on_a_cpu_device():
    """A GPU checkpoint resumed on the CPU: the CUDA generator's state has nowhere to go and is left out."""
    torch.manual_seed(4)
    state = {"rng.torch": torch.get_rng_state(), "rng.cuda": torch.zeros(16, dtype=torch.uint8)}
    first = torch.rand(8)
    checkpoint.restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(8), first)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA (untested on CPU machines)")
def test_on_a_cuda_device_the_cuda_generator_is_saved_and_restored():
    device = torch.device("cuda")
    state = checkpoint.rng_tensors(device)
    assert set(state) == {"rng.torch", "rng.cuda"}
    first = torch.rand(8, device=device)
    checkpoint.restore_rng(state, device)
    assert torch.equal(torch.rand(8, device=device), first)


def test_the_student_trainer_saves_and_restores_the_rng_of_its_device(training_cache, tmp_path):
    from featcache.train import config
    from featcache.train.loop import Trainer, checkpoint_files
    from safetensors.torch import load_file
    from tests.test_train.test_loop import CONFIG

    (tmp_path / "train.toml").write_text(CONFIG)
    trainer = Trainer(config.load(tmp_path / "train.toml", cache=str(training_cache)), tmp_path / "run")
    trainer.save("last")
    state = load_file(str(checkpoint_files(tmp_path / "run", "last")[1]))
    assert {k for k in state if k.startswith("rng.")} == set(checkpoint.rng_tensors(trainer.device))
    first = torch.rand(8, device=trainer.device)
    trainer.load("last")
    assert torch.equal(torch.rand(8, device=trainer.device), first)
