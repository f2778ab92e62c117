"""``featcache featsharp``'s command line against user mistakes and damaged checkpoints: one line on
stderr, exit 2, nothing written (issue 23, items 4, 15, 16 and 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from featcache.cli import main
from tests.test_upsample.conftest import upsampler_file


def _one_line(capsys, says: str) -> None:
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def _train_argv(out, teacher, images, *more) -> list[str]:
    return ["featsharp", "train", "--out", str(out), "--teacher", f"family=dinov3,source={teacher}",
            "--images", str(images), "--steps", "2", "--batch-size", "2", "--set", "heads=4",
            "--set", "stats_images=4", *more]


@pytest.mark.parametrize("more, says", [
    (["--lr", "-1"], "lr and mlp_ratio must be > 0, not -1.0"),
    (["--set", "heads=notjson"], "heads = 'notjson' is not an int"),
    (["--set", "seed=1.5"], "seed = 1.5 is not an int"),
    (["--set", "zoom=5"], "zoom = 5 is not a list of float"),
    (["--set", "lr=NaN"], "lr = nan is not a float"),
    (["--set", "window=4"], "window must be odd, not 4"),
    (["--set", "heads=0"], "heads must be >= 1, not 0"),
    (["--set", "policy=crop"], "policy 'crop' is not one of squash, center"),
    (["--set", "min_lr=0.1"], "min_lr (0.1) must not exceed lr (0.001)"),
])
def test_bad_settings_are_refused_in_one_line_before_any_folder(patch_local_dir, photo_dir, tmp_path, capsys,
                                                                 more, says):
    assert main(_train_argv(tmp_path / "run", patch_local_dir, photo_dir, *more)) == 2
    _one_line(capsys, says)
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it_is_one_line(patch_local_dir, photo_dir, trained_dir, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's answer, on any machine
    assert main(_train_argv(tmp_path / "run", patch_local_dir, photo_dir, "--device", "cuda")) == 2
    _one_line(capsys, "device 'cuda' was asked for, but torch sees no CUDA device")
    assert not (tmp_path / "run").exists()
    assert main(["featsharp", "eval", str(trained_dir), "--images", str(photo_dir), "--device", "cuda"]) == 2
    _one_line(capsys, "device 'cuda' was asked for, but torch sees no CUDA device")
    assert main(["featsharp", "eval", str(trained_dir), "--images", str(photo_dir), "--device", "tpu"]) == 2
    _one_line(capsys, "device 'tpu' is not one of auto, cpu, cuda")


def test_train_help_marks_the_required_options(capsys):
    assert main(["featsharp", "train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for option in ("--teacher <str>", "--images <str>"):
        after = help_text.split(option, 1)[1].split(" --", 1)[0]
        assert "[required for a new run]" in after, after
    assert "--out <str> Checkpoint folder (weights, config, state, metrics). [required]" in help_text


@pytest.mark.parametrize("text, says", [
    ('{"family": "dinov3", "steps": ', "train.json is damaged"),
    ("[1, 2]", "expected a JSON object of settings, not list"),
])
def test_a_damaged_train_json_is_refused_on_resume(old_run_copy, capsys, text, says):
    (old_run_copy / "train.json").write_text(text)
    assert main(["featsharp", "train", "--out", str(old_run_copy), "--resume"]) == 2
    _one_line(capsys, says)


def test_an_ill_typed_train_json_is_refused_on_resume(old_run_copy, capsys):
    saved = json.loads((old_run_copy / "train.json").read_text())
    (old_run_copy / "train.json").write_text(json.dumps({**saved, "steps": "many"}))
    assert main(["featsharp", "train", "--out", str(old_run_copy), "--resume"]) == 2
    _one_line(capsys, "steps = 'many' is not an int")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_description(**changes):
    def edit(path: Path) -> None:
        d = json.loads(path.read_text())
        for key, value in changes.items():
            section, _, name = key.partition(".")
            (d[section].__setitem__(name, value) if name else d.__setitem__(section, value))
        path.write_text(json.dumps(d))
    return edit


def _edit_weights(name: str, change):
    def edit(path: Path) -> None:
        state = load_file(str(path))
        new = change(state.pop(name))
        if new is not None:
            state[name] = new
        save_file(state, str(path), metadata={"format": "featcache-featsharp-1"})
    return edit


DAMAGES = {
    "truncated description": ("featsharp.json", _truncate, "featsharp.json is damaged"),
    "a list for a description": ("featsharp.json", lambda p: p.write_text("[]"), "featsharp.json is damaged"),
    "text channels": ("featsharp.json", _edit_description(**{"config.channels": "x"}), "featsharp.json is damaged"),
    "text step": ("featsharp.json", _edit_description(step="three"), "featsharp.json is damaged"),
    "no heldout rule": ("featsharp.json", _edit_description(heldout=5), "featsharp.json is damaged"),
    "truncated weights": ("featsharp.safetensors", _truncate, "featsharp.safetensors is damaged"),
    "text weights": ("featsharp.safetensors", lambda p: p.write_text("weights"), "featsharp.safetensors is damaged"),
    "half-precision weights": ("featsharp.safetensors", _edit_weights("debias", lambda t: t.half()),
                               "debias is float16, the upsampler needs float32"),
    "misshapen weights": ("featsharp.safetensors", _edit_weights("debias", lambda t: t[:, :2].contiguous()),
                          "debias has shape (32, 2, 4), the upsampler needs (32, 4, 4)"),
    "missing weights": ("featsharp.safetensors", _edit_weights("debias", lambda t: None), "lacks debias"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_in_eval_and_in_extract(run_copy, patch_local_dir, photo_dir, tmp_path,
                                                                 capsys, damage):
    name, change, says = DAMAGES[damage]
    change(upsampler_file(run_copy, name))
    assert main(["featsharp", "eval", str(run_copy), "--images", str(photo_dir), "--views", "1"]) == 2
    _one_line(capsys, says)
    teacher = f"family=dinov3,source={patch_local_dir},upsampler={run_copy},codec=f32"
    assert main(["extract", "--source", str(photo_dir), "--out", str(tmp_path / "cache"), "-t", teacher]) == 2
    _one_line(capsys, says)


def test_train_says_what_it_waits_for_before_each_long_stretch(patch_local_dir, photo_dir, tmp_path, capsys,
                                                               monkeypatch):
    """Loading the teacher, fitting PHI-S and the first step can each take many seconds with a real
    teacher: a line says so before each; between logged steps a line comes every PROGRESS_SECONDS
    (0 here: after every step)."""
    from featcache.upsample import training

    monkeypatch.setattr(training.Trainer, "PROGRESS_SECONDS", 0.0)
    assert main(_train_argv(tmp_path / "run", patch_local_dir, photo_dir, "--steps", "3",
                            "--set", "log_every=100")) == 0
    lines = capsys.readouterr().err.splitlines()
    firsts = ["loading the teacher dinov3 from", "fitting PHI-S of", "PHI-S of", "training 3 steps of 2 canvases",
              "step 1/3 (", "step 2/3 (", "step 3/3: loss"]
    at = [next(k for k, line in enumerate(lines) if line.startswith(first)) for first in firsts]
    assert at == sorted(at) and at[0] == 0, lines


def test_a_damaged_pointer_is_one_line_in_eval_and_resume(run_copy, photo_dir, capsys):
    (run_copy / "checkpoints" / "last" / "current.json").write_text('{"set": ')  # written whole: edited by hand
    assert main(["featsharp", "eval", str(run_copy), "--images", str(photo_dir)]) == 2
    _one_line(capsys, "current.json is damaged")
    assert main(["featsharp", "train", "--out", str(run_copy), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "current.json is damaged" in err[-1] and not any("Traceback" in x for x in err), err
