"""A run folder through failures: checkpoints land as a set whatever moment a kill strikes, older
run folders still resume, a failed start leaves no folder behind, and a finished run says how to go on."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import checkpoint
from featcache.cli import main
from featcache.train import config
from tests.test_s3_preflight import closed_endpoint  # noqa: F401 (a fixture)
from tests.test_train.test_loop import LOSS_KEYS, _losses
from tests.test_train.test_loop import cache_root, config_file  # noqa: F401 (fixtures: this module's own copies)

pytestmark = pytest.mark.slow


@pytest.fixture
def whole(whole_run) -> Path:
    """The 12-step run, uninterrupted (the session's)."""
    return whole_run


def _killed_at_save(cache_root: str, config_file: Path, run: Path, call: int) -> None:
    """Train in a subprocess that SIGKILLs itself as it begins its ``call``-th checkpoint file write
    (1-3: best at step 0, 4-6: last at step 4, 7-9: last at step 8; state, weights, then the maps back to
    the teachers' spaces)."""
    code = (
        "import os, signal, sys\n"
        "from featcache import checkpoint\n"
        "from featcache.train import config, train\n"
        "real, calls = checkpoint.save, [0]\n"
        "def save(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        f"    if calls[0] == {call}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        "checkpoint.save = save\n"
        f"train(config.load({str(config_file)!r}, cache={cache_root!r}), {str(run)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.fixture(scope="module")
def killed(cache_root, config_file, tmp_path_factory) -> Path:
    """The 12-step run killed as it began its 8th checkpoint file write: step 8's state written, its weights
    not yet; the step-4 checkpoint is whole. Tests resume copies of it."""
    run = tmp_path_factory.mktemp("killed") / "run"
    _killed_at_save(cache_root, config_file, run, call=8)
    return run


def _resume_matches(run: Path, whole: Path) -> None:
    """``featcache train --out RUN --resume`` (in this process: the kill was another's) logs the uninterrupted
    run's losses."""
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = _losses(whole), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        for k in LOSS_KEYS:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-9), (step, k)


def test_a_kill_between_a_checkpoints_two_files_resumes_with_the_same_losses(killed, whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed, run)  # step 8's state written, its weights not yet
    _resume_matches(run, whole)


def test_a_run_folder_of_the_older_layout_still_resumes(killed, whole, tmp_path):
    """Runs written before checkpoint sets kept checkpoints/last.safetensors + last.state.safetensors."""
    run = tmp_path / "run"
    shutil.copytree(killed, run)  # the step-4 checkpoint is whole (step 8's, half-written, goes with the sets)
    folder = run / "checkpoints"
    for name in ("best", "last"):
        found = checkpoint.read_set(folder / name)
        shutil.copyfile(found[0] / "student.safetensors", folder / f"{name}.safetensors")
        shutil.copyfile(found[0] / "state.safetensors", folder / f"{name}.state.safetensors")
        shutil.rmtree(folder / name)
    _resume_matches(run, whole)
    assert sorted(p.name for p in folder.iterdir()) == ["best", "last"]  # the stale older pair is gone


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A disk that fills (or a kill) while a line is written leaves half a line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    checkpoint.truncate_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "a": 1.0},
                                                                            {"step": 2, "a": 2.0}]


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def _new(cache_root, config_file, run, *args) -> list[str]:
    return ["train", str(cache_root), "--config", str(config_file), "--out", str(run), *args]


@pytest.mark.parametrize("args, message", [
    (["--set", "teachers=[{name='x', low='nope@64'}]"], "view nope@64 is not in"),
    (["--set", "eval.knn=true"], "needs a 'label' column"),
    (["--device", "cuda"], "device 'cuda' was asked for, but torch sees no CUDA device"),
    (["--batch-size", "100000"], "optim.batch_size 100000 is larger than the 23 training rows"),
    (["--set", "student.size='base'", "--set", "resolution.low=[8192]", "--set", "eval.resolution=64",
      "--batch-size", "20"], "GiB of activations at resolution 8192"),
    (["--init", "NOT_SAFETENSORS"], "is not a safetensors file"),
])
def test_a_failed_start_leaves_no_folder_and_the_retry_runs(cache_root, config_file, tmp_path, capsys, args,
                                                           message):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "NOT_SAFETENSORS").write_text("weights? no")
    args = [str(tmp_path / a) if a == "NOT_SAFETENSORS" else a for a in args]
    run = tmp_path / "run"
    code, err = _cli(_new(cache_root, config_file, run, *args), capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not run.exists()
    code, err = _cli(_new(cache_root, config_file, run, "--steps", "1"), capsys)
    assert code == 0, err


def test_a_missing_cache_leaves_no_folder(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _cli(_new(tmp_path / "no-cache", config_file, run), capsys)
    assert code == 2 and len(err) == 1 and "no-cache" in err[0], err
    assert not run.exists()


def test_a_folder_without_a_checkpoint_is_not_a_run(cache_root, config_file, tmp_path, capsys):
    """What a failed start of an older featcache left: config.toml, metrics, no checkpoint. A new run
    takes it over; --resume starts its run from step 0 with its own config (featcache.runs' rule)."""
    for how, says in (("new", "starting it over"), ("resume", "holds no checkpoint yet: starting its run from step 0")):
        run = tmp_path / how
        run.mkdir()
        (run / "config.toml").write_text(config.load(config_file, cache=cache_root, overrides=["optim.steps=1"]).to_toml())
        (run / "metrics.jsonl").write_text('{"step": 0, "heldout/x": 1.0}\n')
        args = _new(cache_root, config_file, run, "--steps", "1") if how == "new" else ["train", "--out", str(run), "--resume"]
        code, err = _cli(args, capsys)
        assert code == 0, err
        assert any(says in line for line in err), err
        assert "heldout/x" not in (run / "metrics.jsonl").read_text()
        assert max(_losses(run)) == 1


def test_the_run_records_its_cache_as_an_absolute_path(cache_root, config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(cache_root).parent)
    run = tmp_path / "run"
    code, err = _cli(_new(Path(cache_root).name, config_file, run, "--steps", "1"), capsys)
    assert code == 0, err
    assert config.load(run / "config.toml").cache == str(Path(cache_root).resolve())


@pytest.mark.s3
def test_an_unreachable_object_store_run_folder_is_one_line(cache_root, config_file, tmp_path, capsys, monkeypatch,
                                                           closed_endpoint):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    code, err = _cli(_new(cache_root, config_file, "s3://bucket/run"), capsys)
    assert code == 2 and len(err) == 1 and f"cannot reach the S3 endpoint {closed_endpoint} for s3://bucket/run" in err[0]
    assert list(tmp_path.iterdir()) == []  # no folder named 's3:'


def test_a_finished_run_says_how_to_train_further(cache_root, config_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(_new(cache_root, config_file, run, "--steps", "1"), capsys)[0] == 0
    for extra in ([], ["--steps", "10"]):
        code, err = _cli(["train", "--out", str(run), "--resume", *extra], capsys)
        assert code == 2 and len(err) == 1 and "already finished its 1 steps" in err[0], err
        assert f"--init {run} --out NEW_RUN" in err[0]
    code, err = _cli(_new(cache_root, config_file, tmp_path / "more", "--init", str(run), "--steps", "2"), capsys)
    assert code == 0 and any(f"initialized from {run}" in line for line in err), err


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_then_starts_it(cache_root, config_file,
                                                                                   tmp_path, capfd):
    """A tmpfs too small for the first checkpoint: exit 1, one line, no traceback; with space made, the
    same command takes the folder over (it holds no checkpoint, so it is no run yet) and finishes."""
    from tests.test_extract.test_storage_errors import _mounted, _remount

    with _mounted(tmp_path / "small", "size=96k") as mount:
        run = mount / "run"
        code = main(_new(cache_root, config_file, run, "--steps", "2"))
        err = capfd.readouterr().err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert code == 1 and last.startswith("featcache: error: no space left on device writing"), last
        assert not list(run.rglob("*.tmp")) and not list((run / "checkpoints").rglob("set-*/*"))
        _remount(mount, "size=64m")
        assert main(_new(cache_root, config_file, run, "--steps", "2")) == 0, capfd.readouterr().err
        assert max(_losses(run)) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_features_stop_the_run_in_one_line_naming_the_row_and_object(cache_root, config_file, tmp_path,
                                                                              capfd, workers):
    """A flipped byte in every dense object of dinov3@64: the first batch fails its crc32c check, in the
    loop's process or in a DataLoader worker alike (no held-out rows: the first read is a batch's)."""
    root = tmp_path / "cache"
    shutil.copytree(cache_root, root)
    for obj in (root / "features.zarr" / "dinov3@64" / "dense" / "c").rglob("*"):
        if obj.is_file():
            data = bytearray(obj.read_bytes())
            data[len(data) // 2] ^= 0xFF
            obj.write_bytes(bytes(data))
    code = main(_new(root, config_file, tmp_path / "run", "--steps", "2", "--workers", str(workers),
                     "--set", "data.heldout=0.0"))
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("featcache: error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1 and errors == err.strip().splitlines()[-1:], err
    assert "dinov3@64: image row" in errors[0] and "fails its crc32c check in" in errors[0], errors
    assert str(root / "features.zarr" / "dinov3@64" / "dense" / "c") in errors[0]


def test_a_partly_extracted_cache_says_which_rows_it_trains_on(cache_root, config_file, tmp_path, capfd):
    root = tmp_path / "cache"
    shutil.copytree(cache_root, root)
    (root / "_commits" / "dinov3@64" / "1.json").unlink()  # shard 1 (rows 8..15) not committed in one view
    assert main(_new(root, config_file, tmp_path / "run", "--steps", "1")) == 0
    err = capfd.readouterr().err
    assert ("training on the 18 of 26 images whose every view is committed and valid; 8 left out "
            "(extraction unfinished or failed images") in err, err
