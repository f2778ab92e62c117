"""Online distillation targets (``data.targets = "online"``, featcache.train.online) on the session's
training cache of real photos and three tiny real teachers: where the crop is the view itself they
equal the cached targets; on a real crop they equal the teacher run by hand on that crop, resampled
and PHI-S'd; a short online run learns and resumes exactly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DINOv3ViTModel

from featcache.errors import UsageError
from featcache.geometry import cell_map, resample
from featcache.train import config, train
from featcache.train.data import Item, collate
from featcache.train.loop import Trainer

TEACHERS = [{"name": "siglip2", "low": "siglip2@64"}, {"name": "dinov3", "low": "dinov3@64", "high": "dinov3@128"},
            {"name": "sam3", "low": "sam3-mosaic2@56"}]
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))  # DINOv3's processor constants


def _cfg(cache, *overrides: str) -> config.TrainConfig:
    d = {"cache": str(cache), "teachers": TEACHERS, "student": {"size": "micro"}, "seed": 3,
         "resolution": {"low": [64, 96], "high": [128], "high_prob": 0.3},
         "crop": {"aligned_prob": 0.5, "flip_prob": 0.5},  # free and mirrored crops too, not the defaults only
         "optim": {"steps": 12, "batch_size": 4, "lr": 2e-3, "warmup": 3},
         "eval": {"every": 100, "resolution": 64, "pictures": False}, "log_every": 1, "checkpoint_every": 6}
    config.configfile.apply_overrides(d, list(overrides))
    return config.from_dict(d)


@pytest.fixture(scope="module")
def trainers(training_cache, tmp_path_factory):
    """The same run's Trainer with cached and with online targets (nothing written)."""
    out = tmp_path_factory.mktemp("online")
    return (Trainer(_cfg(training_cache), out / "cache"),
            Trainer(_cfg(training_cache, "data.targets=online"), out / "online"))


def test_an_unknown_target_source_is_a_one_line_error(training_cache):
    with pytest.raises(UsageError, match="data.targets must be one of 'cache', 'online', not 'onlne'"):
        _cfg(training_cache, "data.targets=onlne")


def test_on_the_views_own_box_and_size_online_targets_equal_the_cached_ones(trainers):
    """An evaluation item is the first view's whole box, unflipped; at 64 px the student grid (4 x 4) is
    every view's grid, so the lookup is the identity and only the teachers' inputs could differ. Rows
    0-3 are one of extraction's 2 x 2 mosaics (rows in order): SAM3's global blocks let a tile's
    features depend on the other tiles, so the mosaic view agrees only for the same four images."""
    cached, online = trainers
    rows = [0, 1, 2, 3]
    a, b = (collate([t.dataset[Item(r, 64, "low", ())] for r in rows]) for t in (cached, online))
    assert "window" not in b["siglip2"] and b["siglip2"]["pixels"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"])  # the student's inputs are the cached run's
    online.task.online.fill(b)
    for t in cached.targets:
        stored, computed = a[t.name]["window"].float(), b[t.name]["window"]
        assert computed.shape == stored.shape == (4, 4, 4, t.channels)
        f16 = stored.abs() * 2.0 ** -11 + 1e-5  # f16 rounds to half an ulp: 2^-11 relative
        assert bool(((computed - stored).abs() <= f16).all()), t.name
        want, got = cached.task.targets_of(a[t.name], (4, 4)), online.task.targets_of(b[t.name], (4, 4))
        rotation = cached.task._phis[t.views["low"]][1]
        assert bool(((got - want).abs() <= f16 @ rotation.abs().T + 1e-5).all()), t.name  # that error through PHI-S
        if t.summary_channels:
            summary = a[t.name]["summary"]
            assert bool(((b[t.name]["summary"] - summary).abs() <= summary.abs() * 2.0 ** -11 + 1e-5).all()), t.name


def test_on_a_real_crop_online_targets_are_the_teacher_run_by_hand(trainers, training_cache):
    """dinov3 on sampled crops (free and aligned, flipped or not) at 96 px and on the high partition's
    128 px view: its transformers model run directly on the crop (Pillow resize, ImageNet normalization
    written out) of the full decode (the loader's student crops of the JPEGs come from a reduced one),
    the map resampled by the reference ``resample``, PHI-S with the view's statistics."""
    _, online = trainers
    view = online.cache.view("dinov3@64")
    model = DINOv3ViTModel.from_pretrained(view.spec.teacher["source"]).eval()
    seen = set()
    for step in range(6):
        items = online.plan.batch(step)
        batch = collate(online.dataset.__getitems__(items))
        grid = (items[0].resolution // 16,) * 2
        got = online.task.targets_of(batch["dinov3"], grid)
        key = batch["dinov3"]["key"]
        for k, item in enumerate(items):
            box, flip = tuple(batch["box"][k].tolist()), bool(batch["flip"][k])
            want = _by_hand(model, online.cache.view(key), online.dataset.image(item.row)[0], box, flip, grid)
            np.testing.assert_allclose(got[k].numpy(), want, atol=1e-5, rtol=1e-5)
            seen.add((key, flip, grid))
    assert {s[0] for s in seen} == {"dinov3@64", "dinov3@128"} and {s[1] for s in seen} == {False, True}


def _by_hand(model, view, image: Image.Image, box, flip: bool, grid) -> np.ndarray:
    size = view.spec.input_size
    rgb = np.asarray(image, np.float32) / 255.0  # resized in float, channel by channel (Pillow's "F" mode)
    crop = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize(
        (size[1], size[0]), Image.BILINEAR, box=box)) for c in range(3)], axis=-1)
    x = torch.from_numpy(((crop - IMAGENET[0]) / IMAGENET[1]).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state[0, 5:]  # CLS and 4 registers first
    h, w = view.spec.grid
    field = tokens.reshape(h, w, -1).numpy().astype(np.float64)
    aligned = resample(field, cell_map(box, grid, box, (h, w), flip), grid)
    mean, rotation = view.reader().phis()
    return (aligned - mean) @ rotation.T.astype(np.float64)


def _losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if "/" in k or k == "mesa"} for r in records if "lr" in r}


def test_a_short_online_run_learns_and_resumes_exactly(training_cache, tmp_path, monkeypatch):
    """20 steps with MESA and DAMP: the loss falls; a run stopped at step 11 (its last checkpoint at 10)
    and resumed logs steps 11-20 exactly as the uninterrupted one."""
    cfg = _cfg(training_cache, "data.targets=online", "loss.mesa=0.5", "loss.damp=0.02", "optim.steps=20", "optim.batch_size=2",
               "checkpoint_every=10")
    train(cfg, tmp_path / "whole")
    whole = _losses(tmp_path / "whole")
    first, last = (np.mean([sum(whole[s].values()) for s in steps]) for steps in ((1, 2, 3), (18, 19, 20)))
    assert last < 0.8 * first, (first, last)
    loader = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self: itertools.islice(loader(self), 11))  # then it stops
    with pytest.raises(StopIteration):
        train(cfg, tmp_path / "stopped")
    monkeypatch.undo()
    train(None, tmp_path / "stopped", resume=True)
    resumed = _losses(tmp_path / "stopped")
    for step in range(11, 21):
        for k, v in whole[step].items():
            assert resumed[step][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (step, k)
