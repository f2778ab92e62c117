"""FeatSharp training: it learns (held-out error falls below the untrained upsampler's with a
patch-local teacher), it resumes exactly, and its command line reports errors in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from featcache.cli import main
from featcache.upsample import training
from featcache.upsample.checkpoint import describe_upsampler, load_upsampler
from featcache.upsample.evaluate import evaluate
from tests.test_upsample.conftest import interrupt_at, settings, upsampler_file

#: a learning run a test can afford (one thread: ~4 s of CPU): 60 steps at a high rate, a third of
#: the photos held out; the realistic run (128-px teacher, 300 steps) is ``benchmarks/featsharp.py --learning``
LEARN = dict(steps=60, save_every=60, lr=8e-3, warmup=10, heldout=0.3, log_every=20)


def test_a_short_run_learns_on_held_out_images(patch_local_dir, photo_dir, tmp_path):
    """60 steps on 20 photos: the held-out error against the exact map (the patch-local teacher's map of
    the whole canvas) and against the teacher's jittered views falls clearly below the untrained
    upsampler's (a run that does not learn, e.g. at lr 0, stays equal), and below bilinear on the exact map."""
    training.train(settings(patch_local_dir, photo_dir, **LEARN), tmp_path / "trained")
    training.train(settings(patch_local_dir, photo_dir, **{**LEARN, "steps": 1, "save_every": 1}), tmp_path / "untrained")
    trained, untrained = (evaluate(str(tmp_path / k), str(photo_dir), views=2) for k in ("trained", "untrained"))
    assert trained.images == untrained.images >= 5 and trained.exact_error is not None
    assert trained.exact_error["featsharp"] < 0.95 * untrained.exact_error["featsharp"], (trained, untrained)
    assert trained.exact_error["featsharp"] < 0.8 * trained.exact_error["bilinear"], trained
    assert trained.featsharp_error < 0.98 * untrained.featsharp_error, (trained, untrained)
    metrics = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [20, 40, 60] and metrics[-1]["mse"] < metrics[0]["mse"]


def test_an_interrupted_run_resumes_exactly(patch_local_dir, photo_dir, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    s = settings(patch_local_dir, photo_dir, steps=6, save_every=3, log_every=1)
    training.train(s, straight)
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        training.train(s, broken)
    monkeypatch.undo()
    with pytest.raises(Exception, match="already holds a FeatSharp run"):
        training.train(s, broken)
    training.train(None, broken, resume=True)
    a, b = (load_file(str(upsampler_file(d, "featsharp.safetensors"))) for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # step 4 logged once, by the resumed run
    assert describe_upsampler(straight).sha256 == describe_upsampler(broken).sha256


def test_a_checkpoint_loads_back_and_its_hash_follows_its_weights(run_copy):
    model, description = load_upsampler(run_copy)
    assert description.step == 2 and description.teacher.family == "dinov3" and description.config.factor == 3
    assert description.config.grid == (4, 4) and description.heldout["fraction"] == 0.1
    before = description.sha256
    weights = upsampler_file(run_copy, "featsharp.safetensors")
    state = load_file(str(weights))
    state["debias"] = state["debias"] + 1
    from safetensors.torch import save_file

    save_file(state, str(weights), metadata={"format": "featcache-featsharp-1", "step": "2"})
    assert describe_upsampler(run_copy).sha256 != before
    assert torch.equal(load_upsampler(run_copy)[0].debias, model.debias + 1)


def test_the_command_line(patch_local_dir, photo_dir, tmp_path, capsys):
    patch_local, photos = patch_local_dir, photo_dir
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
        err = capsys.readouterr().err.strip().splitlines()  # the error, after the line saying what loads
        assert says in err[-1] and err[-1].startswith("featcache: error: ") and len(err) <= 2, err
        assert err[:-1] in ([], [f"loading the teacher dinov3 from {patch_local} on cpu…"]), err
    assert not (tmp_path / "b1").exists()  # a run that cannot start leaves no folder
