"""The training run's pictures people can read (issue 25): titled by the image's ``image_id``, the image beside
the PCA panels, and the error maps on one colour scale for the whole run, kept across ``--resume``."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from featcache.store import Cache
from featcache.train import config, train
from featcache.train.loop import Trainer
from featcache.train.pictures import SCALE_FILE, pca_picture
from featcache.viz import HEIGHT, LABEL, error_scale, read_png_text
from tests.test_train.test_loop import CONFIG

TEACHERS = ("siglip2", "dinov3", "sam3")


def test_error_scale_is_the_99th_percentile_written_out():
    err = np.random.default_rng(0).exponential(size=(7, 9)).astype(np.float32)
    err[0, 0] = np.nan  # off Ω: left out
    values = np.sort(err[np.isfinite(err)].astype(np.float64))
    at = 0.99 * (len(values) - 1)  # linear interpolation between the two ranks around it
    want = values[int(at)] + (at - int(at)) * (values[int(at) + 1] - values[int(at)])
    assert error_scale(err) == pytest.approx(want, rel=1e-6)
    one_bad = np.zeros((10, 30), np.float32)
    one_bad[3, 3] = 5.0  # a 99th percentile of 0: the maximum instead, so the bad cell still shows
    assert error_scale(one_bad) == 5.0


def test_a_given_scale_colours_the_error_map_and_is_recorded(tmp_path):
    teacher = np.zeros((2, 2, 4), np.float32)
    teacher[0, 0] = 1.0  # some spread for the PCA
    student = teacher.copy()
    student[1, 1] += 1.0  # MSE 1 in that cell, 0 elsewhere
    path, err = pca_picture(student, teacher, None, tmp_path / "p.png", title="image astronaut", vmax=2.0)
    assert err[1, 1] == 1.0 and read_png_text(path) == ("image astronaut", 2.0)
    picture = np.asarray(Image.open(path))
    cell = HEIGHT // 2
    x = 2 * (HEIGHT + 4) + cell + cell // 2  # the error panel (third), cell (1, 1)
    assert tuple(picture[2 * LABEL + cell + cell // 2, x]) == (255, 0, 0)  # half the scale: pure red


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_keeps_one_error_scale_across_steps_and_resume(training_cache, tmp_path, monkeypatch):
    """Pictures at 0 and 2, a stop after step 3 (checkpoint at 2), a resume to 4: every picture of a teacher
    has the scale the first one fixed, saved in the pictures folder, and names the held-out image by id."""
    (tmp_path / "train.toml").write_text(CONFIG)
    cfg = config.load(tmp_path / "train.toml", cache=str(training_cache), overrides=[
        "optim.steps=4", "optim.batch_size=2", "eval.every=2", "checkpoint_every=2", 'device="cpu"'])
    run = tmp_path / "run"
    loader = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self: itertools.islice(loader(self), 3))  # then it stops
    with pytest.raises(StopIteration):
        train(cfg, run)
    monkeypatch.undo()
    before = json.loads((run / "pictures" / SCALE_FILE).read_text())
    train(None, run, resume=True)
    saved = json.loads((run / "pictures" / SCALE_FILE).read_text())
    assert saved == before and saved["step"] == 0 and set(saved["scales"]) == set(TEACHERS)
    ids = Cache.open(str(training_cache)).manifest.column("image_id").to_pylist()
    assert saved["image_id"] in ids
    for name in TEACHERS:
        for step in (0, 2, 4):
            title, scale = read_png_text(run / "pictures" / f"step{step:07d}-{name}.png")
            assert scale == saved["scales"][name] > 0, (name, step)
            assert title == f"image {saved['image_id']}: {name}, step {step}"
