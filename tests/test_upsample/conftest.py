"""Fixtures of the FeatSharp tests, made once per session: the photos, a patch-local teacher and a
two-step checkpoint (a fresh copy per test that damages it)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from featcache.upsample import training
from featcache.upsample.checkpoint import current
from tests.support.teachers import save_patch_local
from tests.support.training import photos

#: a run small enough for a test: two canvases of two views a step, 4 heads over the fuser's 64 channels
TINY = dict(batch_size=2, views=2, heads=4, stats_images=4, warmup=2, log_every=1)


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread: these small models gain nothing from two, and on a shared machine two
    threads that wait on each other's barrier run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test of this folder on one torch thread (restored after each module)."""
    with one_torch_thread():
        yield


def upsampler_file(run: Path, name: str) -> Path:
    """Where a run folder keeps its upsampler's ``name`` now (its current checkpoint set)."""
    return current(run) / name


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """The 26 photos scikit-image ships (about a tenth held out by the id rule)."""
    return photos(tmp_path_factory.mktemp("featsharp_photos"))


@pytest.fixture(scope="session")
def patch_local_dir(tmp_path_factory):
    """DINOv3 with no blocks at 64 px (a 4x4 grid of 32 channels): each patch's features depend on
    its pixels only, so its map of a 3x canvas is the exact map its tiles give."""
    return save_patch_local(tmp_path_factory.mktemp("featsharp_teacher") / "t")[0]


def settings(teacher, images, **kw) -> training.Settings:
    """Settings of a tiny run of ``teacher`` on ``images`` (``kw`` overrides)."""
    return training.Settings(family="dinov3", source=str(teacher), images=str(images), **{**TINY, **kw})


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, patch_local_dir, photo_dir):
    """A finished two-step run (read only: copy it to damage it)."""
    out = tmp_path_factory.mktemp("featsharp_run") / "run"
    with one_torch_thread():
        training.train(settings(patch_local_dir, photo_dir, steps=2, save_every=1), out)
    return out


@pytest.fixture
def run_copy(trained_dir, tmp_path):
    """A copy of the two-step run this test may damage."""
    return shutil.copytree(trained_dir, tmp_path / "run")


#: a FeatSharp run folder of the layout before featcache.runs, written by featcache 0470a58
#: (tests/fixtures/featsharp-run-v2.py): train.json and the checkpoint set in the folder itself, stopped
#: after step 1 of 2; its teacher and images are placeholders :func:`old_run` fills in
OLD_RUN = Path(__file__).parents[1] / "fixtures" / "featsharp-run-v2"


def old_run(folder: Path, teacher, images) -> Path:
    """A copy of :data:`OLD_RUN` at ``folder`` whose train.json names ``teacher`` and ``images``."""
    run = Path(shutil.copytree(OLD_RUN, folder))
    saved = json.loads((run / "train.json").read_text())
    (run / "train.json").write_text(json.dumps({**saved, "source": str(teacher), "images": str(images)}))
    return run


@pytest.fixture
def old_run_copy(tmp_path, patch_local_dir, photo_dir):
    """A copy of the older-layout run this test may damage or resume."""
    return old_run(tmp_path / "old", patch_local_dir, photo_dir)


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the trainer stop with a KeyboardInterrupt as it reaches ``step`` (as Ctrl-C would);
    ``monkeypatch.undo()`` puts the real loss back."""
    original = training.Trainer.loss

    def stopping(self, at):
        if at == step:
            raise KeyboardInterrupt
        return original(self, at)

    monkeypatch.setattr(training.Trainer, "loss", stopping)
