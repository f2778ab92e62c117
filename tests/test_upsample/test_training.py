"""FeatSharp training: it works (held-out error below bilinear with a patch-local teacher), it
resumes exactly, and its command line reports errors in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from featcache.cli import main
from featcache.upsample import training
from featcache.upsample.checkpoint import describe_upsampler, load_upsampler
from featcache.upsample.evaluate import evaluate
from tests.support.images import skimage_photos
from tests.support.teachers import DINOV3

TINY = dict(batch_size=2, views=2, heads=4, stats_images=8, warmup=20, log_every=50, lr=1e-3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """All 26 photos scikit-image ships (about a fifth held out by the id rule)."""
    folder = tmp_path_factory.mktemp("photos")
    for p in skimage_photos():
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def patch_local(tmp_path_factory):
    """DINOv3 with no blocks at 128 px (an 8x8 grid): each patch's features depend on its pixels only,
    so the exact 24x24 map of a 384-px canvas is the teacher's own map of it."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("patch_local") / "t"
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**{**DINOV3, "num_hidden_layers": 0, "image_size": 128})).eval().save_pretrained(folder)
    return folder


def _settings(teacher, photos, **kw) -> training.Settings:
    return training.Settings(family="dinov3", source=str(teacher), images=str(photos), **{**TINY, **kw})


@pytest.mark.slow
def test_a_short_run_beats_bilinear_on_held_out_images(patch_local, photos, tmp_path):
    """300 steps on 21 photos: against the teacher's jittered views and against the exact map, the
    held-out error falls below both bilinear upsampling of the global view and the untrained upsampler."""
    training.train(_settings(patch_local, photos, steps=300, save_every=300), tmp_path / "trained")
    training.train(_settings(patch_local, photos, steps=1, save_every=1), tmp_path / "untrained")
    trained, untrained = (evaluate(str(tmp_path / k), str(photos)) for k in ("trained", "untrained"))
    assert trained.images == untrained.images >= 3 and trained.exact_error is not None
    assert trained.featsharp_error < min(trained.bilinear_error, untrained.featsharp_error), trained
    assert trained.exact_error["featsharp"] < min(trained.exact_error["bilinear"], untrained.exact_error["featsharp"])
    metrics = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(50, 301, 50))


def test_an_interrupted_run_resumes_exactly(patch_local, photos, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    settings = _settings(patch_local, photos, steps=6, save_every=3, log_every=1)
    training.train(settings, straight)
    original = training.Trainer.loss

    def stop_at_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(training.Trainer, "loss", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        training.train(settings, broken)
    monkeypatch.setattr(training.Trainer, "loss", original)
    with pytest.raises(Exception, match="already holds a FeatSharp run"):
        training.train(settings, broken)
    training.train(None, broken, resume=True)
    a, b = (load_file(str(d / "featsharp.safetensors")) for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # step 4 logged once, by the resumed run
    assert describe_upsampler(straight).sha256 == describe_upsampler(broken).sha256


def test_a_checkpoint_loads_back_and_its_hash_follows_its_weights(patch_local, photos, tmp_path):
    training.train(_settings(patch_local, photos, steps=2, save_every=2), tmp_path / "run")
    model, description = load_upsampler(tmp_path / "run")
    assert description.step == 2 and description.teacher.family == "dinov3" and description.config.factor == 3
    assert description.config.grid == (8, 8) and description.heldout["fraction"] == 0.1
    before = description.sha256
    weights = tmp_path / "run" / "featsharp.safetensors"
    state = load_file(str(weights))
    state["debias"] = state["debias"] + 1
    from safetensors.torch import save_file

    save_file(state, str(weights), metadata={"format": "featcache-featsharp-1", "step": "2"})
    assert describe_upsampler(tmp_path / "run").sha256 != before
    assert torch.equal(load_upsampler(tmp_path / "run")[0].debias, model.debias + 1)


def test_the_command_line(patch_local, photos, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["featsharp", "train", "--out", str(out), "--teacher", f"family=dinov3,source={patch_local}",
                 "--images", str(photos), "--steps", "2", "--batch-size", "2", "--set", "heads=4",
                 "--set", "stats_images=4"]) == 0
    capsys.readouterr()
    picture = tmp_path / "fs.png"
    assert main(["featsharp", "eval", str(out), "--images", str(photos), "--views", "1", "--json",
                 "--picture", str(picture)]) == 0
    report = json.loads(capsys.readouterr().out)
    from PIL import Image

    with Image.open(picture) as im:  # four PCA panels side by side: global, bilinear, FeatSharp, tiles
        assert im.format == "PNG" and im.width > 3 * im.height
    assert set(report) == {"images", "featsharp_error", "bilinear_error", "exact_error", "factor", "views"}
    assert report["factor"] == 3 and set(report["exact_error"]) == {"featsharp", "bilinear"}
    for argv, says in (
        (["featsharp", "train", "--out", str(tmp_path / "b1"), "--teacher", f"family=dinov3,source={patch_local}",
          "--images", str(photos), "--set", "heads=5"], "5 heads do not divide the fuser's 64 channels"),
        (["featsharp", "train", "--out", str(tmp_path / "b2"), "--teacher", "family=dinov3", "--images", str(photos)],
         "give family=,source=[,revision=] or preset="),
        (["featsharp", "train", "--out", str(out), "--resume", "--steps", "3"], "give only --out"),
        (["featsharp", "eval", str(tmp_path), "--images", str(photos)], "is not an upsampler checkpoint"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "b1").exists()  # a run that cannot start leaves no folder
