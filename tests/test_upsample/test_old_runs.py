"""FeatSharp run folders written before the shared run-folder layout still work: ``extract`` and ``eval``
load their upsampler, and ``--resume`` finishes them in their own layout.

The folder is ``tests/fixtures/featsharp-run-v2``, written by featcache 0470a58 (``conftest.OLD_RUN``).
"""

from __future__ import annotations

import json
import shutil

from featcache import checkpoint
from featcache.cli import main
from featcache.upsample.checkpoint import describe_upsampler, load_upsampler

def test_an_old_featsharp_run_loads_for_extract(old_run_copy):
    run = old_run_copy
    model, description = load_upsampler(run)
    assert description.step == 1 and description.config.factor == 3 and description.config.heads == 4
    assert description.sha256 == "sha256:ed42f4604a6e013837ebe2e7c67ebdc4cfbc91f3f73763366df9030995c18820"


def test_an_old_featsharp_run_resumes_in_its_own_layout(old_run_copy, capsys):
    run = old_run_copy
    assert main(["featsharp", "train", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert describe_upsampler(run).step == 2 and checkpoint.read_set(run)[1] == {"step": 2}
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("set-")) == [
        "current.json", "metrics.jsonl", "train.json"]
    assert main(["featsharp", "train", "--out", str(run), "--resume"]) == 2
    assert "already finished its 2 steps" in capsys.readouterr().err


def test_a_new_run_over_an_old_folder_without_a_checkpoint_writes_the_current_layout(old_run_copy, patch_local_dir,
                                                                                    photo_dir, capsys):
    """An older folder that never saved a checkpoint is taken over in today's layout (its train.json
    removed), and the run it starts resumes; before, TOML went into train.json and --resume called it
    damaged."""
    run = old_run_copy
    for stale in [run / "current.json", run / "metrics.jsonl", *run.glob("set-*")]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    argv = ["featsharp", "train", "--out", str(run), "--teacher", f"family=dinov3,source={patch_local_dir}",
            "--images", str(photo_dir), "--steps", "1", "--batch-size", "2", "--set", "heads=4", "--set", "stats_images=4"]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.toml", "metrics.jsonl"]
    assert checkpoint.read_set(run / "checkpoints" / "last")[1] == {"step": 1}
    capsys.readouterr()
    assert main(["featsharp", "train", "--out", str(run), "--resume"]) == 2  # its config reads back: finished
    assert "already finished its 1 steps" in capsys.readouterr().err
