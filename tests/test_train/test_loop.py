"""``featcache train`` on a cache of real photos with three tiny teachers: the losses fall on held-out
images, a run folder as distillation users know it, ``--resume`` after ``kill -9`` reproduces the
uninterrupted run, ``--init`` starts from weights, the batched lookup equals the reference, and the
training process never imports a teacher."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import checkpoint
from featcache.cli import main
from featcache.geometry import crop_targets
from featcache.train import config, train
from featcache.train.data import collate
from featcache.train.loop import Trainer, step_line
from featcache.train.weights import load_bare_student
from tests.support import training

pytestmark = pytest.mark.slow

CONFIG = f"""
seed = 3
log_every = 1
checkpoint_every = 4

{training.TWO_TEACHERS}
[[teachers]]
name = "sam3"
low = "sam3-mosaic2@56"
spatial = 0.5

[student]
size = "micro"

[resolution]
low = [64, 96]
high = [128]
high_prob = 0.3

[optim]
steps = 12
batch_size = 4
lr = 2e-3
warmup = 3

[loss]
mesa = 0.5
damp = 0.02

[eval]
every = 100
resolution = 64
"""
LOSS_KEYS = ("siglip2/spatial", "siglip2/summary", "dinov3/spatial", "dinov3/summary", "sam3/spatial",
             "sam3/summary", "mesa")


@pytest.fixture(scope="module")
def cache_root(training_cache) -> str:
    """The session's training cache (tests/support/training.py): tests that change a cache copy it first."""
    return str(training_cache)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "train.toml"
    path.write_text(CONFIG)
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in _records(run) if "lr" in r}


@pytest.fixture(scope="module")
def long_run(cache_root, config_file, tmp_path_factory):
    """40 steps with an evaluation at 0 and at the end."""
    run = tmp_path_factory.mktemp("runs") / "long"
    cfg = config.load(config_file, cache=cache_root, overrides=["optim.steps=40", "eval.every=40", "log_every=10",
                                                                "checkpoint_every=40"])
    return run, train(cfg, run)


def test_a_short_run_lowers_every_loss_term_on_held_out_images(long_run):
    run, result = long_run
    evals = {r["step"]: r for r in _records(run) if "lr" not in r}
    assert sorted(evals) == [0, 40]
    terms = [k for k in evals[0] if k.startswith("heldout/")]
    assert len(terms) == 6  # spatial and summary of three teachers (MESA is a training term)
    for k in terms:
        assert evals[40][k] < evals[0][k], (k, evals[0][k], evals[40][k])
    assert result.steps == 40 and result.heldout == {k: evals[40][k] for k in terms}


def test_the_run_folder_holds_config_checkpoints_metrics_and_pictures(long_run, cache_root):
    run, _ = long_run
    saved = config.load(run / "config.toml")  # the resolved config reads back as the run's
    assert saved.cache == cache_root and saved.optim.steps == 40 and saved.teachers[2].spatial == 0.5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    for name in ("best", "last"):  # one checkpoint set each: weights, state and the maps to the teachers' spaces
        found = checkpoint.read_set(run / "checkpoints" / name)
        assert sorted(p.name for p in found[0].iterdir()) == ["product.safetensors", "state.safetensors", "student.safetensors"]
    assert checkpoint.read_set(run / "checkpoints" / "last")[1] == {"step": 40}
    train_records = [r for r in _records(run) if "lr" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40]
    assert all(r["samples_per_s"] > 0 and r["bytes_read_per_s"] > 0 for r in train_records)
    pictures = sorted(p.name for p in (run / "pictures").iterdir())
    assert pictures == ["error-scale.json"] + [f"step{s:07d}-{t}.png" for s in (0, 40) for t in ("dinov3", "sam3", "siglip2")]


def test_load_bare_student_returns_the_trained_module(long_run, cache_root):
    run, _ = long_run
    student = load_bare_student(run, which="last")
    trainer = Trainer(config.load(run / "config.toml"), run)
    trainer.load("last")
    trainer.student.eval()
    pixels = torch.randn(2, 3, 64, 96)
    a, b = student(pixels), trainer.student(pixels)
    assert not student.training and a.grid == (4, 6)
    for name in ("siglip2", "dinov3", "sam3"):
        assert torch.equal(a.dense[name], b.dense[name]) and torch.equal(a.summary[name], b.summary[name])


def test_init_starts_a_new_run_from_the_weights(long_run, cache_root, config_file, tmp_path):
    run, result = long_run
    cfg = config.load(config_file, cache=cache_root, overrides=["optim.steps=1", "eval.every=100"])
    new = tmp_path / "from-init"
    train(cfg, new, init=str(run))
    first = next(r for r in _records(new) if r["step"] == 0 and "lr" not in r)
    # the new run's step-0 evaluation is the old run's last: same weights, same held-out images
    for k, v in result.heldout.items():
        assert first[k] == pytest.approx(v, rel=1e-6), k


def test_resume_after_kill_9_reproduces_the_uninterrupted_losses(cache_root, config_file, tmp_path, whole_run, capfd):
    """A run killed mid-way (another process: kill -9) and resumed by ``featcache train --resume`` (here)."""
    whole = whole_run  # the same config, uninterrupted (the session's)
    cli = str(Path(sys.executable).with_name("featcache"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([cli, "train", cache_root, "--config", str(config_file), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    state = killed / "checkpoints" / "last" / checkpoint.POINTER
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: at or just after the step-4 checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    logged = max(_losses(killed))
    assert 4 <= logged < 12, logged  # it died mid-run, after the first checkpoint
    capfd.readouterr()
    code = main(["train", "--out", str(killed), "--resume"])
    err = capfd.readouterr().err
    assert code == 0, err
    assert "resuming" in err and "at step " in err
    a, b = _losses(whole), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        for k in LOSS_KEYS:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-9), (step, k)


def test_the_batched_lookup_equals_the_reference_on_real_batches(long_run, cache_root):
    run, _ = long_run
    trainer = Trainer(config.load(run / "config.toml"), run)
    for step in (0, 5, 11):  # low and high partitions, flips, aligned and free crops
        items = trainer.plan.batch(step)
        samples = [trainer.dataset[item] for item in items]
        batch = collate(samples)
        grid = (items[0].resolution // 16,) * 2
        for t in trainer.targets:
            key = t.views[items[0].partition]
            assert batch[t.name]["window"].dtype == torch.float16  # read as stored; PHI-S on the device
            got = trainer.task.targets_of(batch[t.name], grid)
            reader = trainer.dataset.reader(key)
            for k, s in enumerate(samples):
                want, omega = crop_targets(reader, s["row"], tuple(s["box"].tolist()), grid, s["flip"], space="phis")
                np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-4, atol=1e-4)
                assert np.array_equal(batch[t.name]["omega"][k].numpy(), omega)


def test_spawned_loader_workers_give_the_same_batches(long_run):
    """The dataset crosses into worker processes by the DataLoader's own means (spawn: it is
    serialized), opens its readers there, and gives exactly the batches of the main process."""
    run, _ = long_run
    trainer = Trainer(config.load(run / "config.toml"), run)
    batches = [trainer.plan.batch(s) for s in range(3)]
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_sampler=batches, num_workers=1, collate_fn=collate,
                                         multiprocessing_context="spawn")
    for got, items in zip(loader, batches):
        want = collate([trainer.dataset[i] for i in items])
        assert torch.equal(got["image"], want["image"])
        for t in trainer.targets:
            assert torch.equal(got[t.name]["window"], want[t.name]["window"])
            assert torch.equal(got[t.name]["map"], want[t.name]["map"])


def test_a_batch_the_dataset_assembles_equals_its_samples_collated(long_run):
    """``CacheDataset.__getitems__`` (image files first, windows prefetched, then read straight into the
    batch's padded buffers) gives what one sample at a time and ``collate`` give, padding zeroed."""
    run, _ = long_run
    trainer = Trainer(config.load(run / "config.toml"), run)
    for step in range(3):
        items = trainer.plan.batch(step)
        got, want = collate(trainer.dataset.__getitems__(items)), collate([trainer.dataset[i] for i in items])
        assert set(got) == set(want) and got["bytes"] == want["bytes"] and torch.equal(got["image"], want["image"])
        for t in trainer.targets:
            assert set(got[t.name]) == set(want[t.name])
            for k, v in want[t.name].items():
                assert (v == got[t.name][k]) if isinstance(v, str) else torch.equal(got[t.name][k], v), (t.name, k)


def test_the_training_process_never_imports_a_teacher(cache_root, config_file, tmp_path):
    code = (
        "import sys\n"
        "from featcache.train import config, train\n"
        f"train(config.load({str(config_file)!r}, cache={cache_root!r}, overrides=['optim.steps=2']), "
        f"{str(tmp_path / 'r')!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('featcache.teachers'))\n"
        "assert not bad, bad\n"
        "print('no teacher')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "no teacher", done.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.warmup_step=5"], "unknown key(s) warmup_step"),
    (["--set", "teachers=[{name='x', low='nope@64'}]"], "view nope@64 is not in"),
    (["--set", "resolution.low=[60]"], "resolution 60 is not a multiple of the student's patch 16"),
])
def test_bad_configs_are_one_line_errors(cache_root, config_file, tmp_path, capsys, args, message):
    code = main(["train", cache_root, "--config", str(config_file), "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_run_folder_is_never_overwritten_and_resume_takes_no_new_config(cache_root, config_file, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", cache_root, "--config", str(config_file), "--out", str(run), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", cache_root, "--config", str(config_file), "--out", str(run)]) == 2
    assert "already holds a run: --resume to continue it" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--lr", "1"]) == 2
    assert "already finished its 1 steps; to train further, start a new run from its weights" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_the_training_reader_reads_several_views_of_an_image_in_one_call(cache_root, tmp_path):
    import shutil

    from featcache.store.cache import Cache
    from featcache.store.loader import CacheReader

    root = tmp_path / "c"
    shutil.copytree(cache_root, root)
    keys = ["dinov3@64", "siglip2@64"]
    (root / "_commits" / "dinov3@64" / "1.json").unlink()  # shard 1 (rows 8..15) not committed in one view
    reader = CacheReader(str(root), keys, space="raw")
    assert len(reader) == 26 - 8 and not set(range(8, 16)) & set(reader.rows.tolist())
    manifest = Cache.open(str(root)).manifest
    assert reader.row_of(manifest.column("image_id")[20].as_py()) == 20
    got = reader.read(20, {"dinov3@64": (1, 3, 0, 2), "siglip2@64": None})
    cache = Cache.open(str(root))
    with cache.view("dinov3@64").reader() as a, cache.view("siglip2@64").reader() as b:
        np.testing.assert_array_equal(got["dinov3@64"]["dense"], a.read(20).dense[1:3, 0:2])
        np.testing.assert_array_equal(got["siglip2@64"]["dense"], b.read(20).dense)
        np.testing.assert_array_equal(got["siglip2@64"]["summary"], b.read(20).summary)
        assert got["dinov3@64"]["bytes"] == a.bytes_for((1, 3, 0, 2)) == 4 * 4 * 32 * 2 + 4  # one chunk + crc


def test_knn_of_student_and_teacher_summaries_on_a_labelled_set(tmp_path):
    """scikit-learn's digits as images with a label and split column: each evaluation reports the
    student's kNN top-1 next to the cached teacher summaries' (benchmarks/train_knn_digits.py
    trains long enough to compare them)."""
    from featcache.train.digits import write_digits
    from featcache.train.evaluate import teacher_knn

    root = tmp_path / "digits-cache"
    training.build(root, write_digits(tmp_path / "digits", n_per_class=8, size=64),
                   training.teachers(tmp_path / "models"), shard_size=32)
    cfg = config.load(None, cache=str(root), overrides=[
        'teachers=[{name="siglip2", low="siglip2@64"}, {name="sam3", low="sam3-mosaic2@56"}]',
        'student.size="micro"', "resolution.low=[64]", "optim.steps=2", "optim.batch_size=8", "eval.every=2",
        "eval.resolution=64", "eval.knn=true", "eval.pictures=false"])
    result = train(cfg, tmp_path / "run")
    evals = [r for r in _records(tmp_path / "run") if "lr" not in r]
    assert [r["step"] for r in evals] == [0, 2]
    for name, key in (("siglip2", "siglip2@64"), ("sam3", "sam3-mosaic2@56")):
        assert evals[-1][f"knn/{name}/teacher"] == teacher_knn(str(root), key)
        assert 0 <= evals[-1][f"knn/{name}/student"] <= 1
        assert result.knn[f"knn/{name}/student"] == evals[-1][f"knn/{name}/student"]
    assert "heldout/siglip2/spatial" in evals[0]  # the held-out rows are the manifest's 'test' split


def test_the_console_line_shows_elapsed_time_and_an_eta_from_this_process_rate():
    """120 of 1,000 steps taken, 20 of them by this process (resumed at 100) in 50 s: 2.5 s a step, 880 to go."""
    line = step_line(step=120, steps=1000, elapsed=50.0, steps_here=20, terms="a/spatial 0.5000", samples_per_s=12.34)
    assert line == "step 120/1000  0:50 elapsed  ETA 36:40  a/spatial 0.5000  12.3 samples/s"
    assert "ETA --" in step_line(step=5, steps=10, elapsed=0.0, steps_here=0, terms="", samples_per_s=0.0)
    assert "1:00:00 elapsed  ETA 0:00" in step_line(step=10, steps=10, elapsed=3600, steps_here=10, terms="x",
                                                    samples_per_s=1)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_gets_a_live_bar_between_the_logged_lines_and_a_log_gets_lines_only(cache_root, config_file,
                                                                                     tmp_path, terminal):
    cfg = config.load(config_file, cache=cache_root, overrides=["optim.steps=6", "log_every=3", "checkpoint_every=6"])
    stream = _Terminal() if terminal else io.StringIO()
    train(cfg, tmp_path / "run", stream=stream)
    text = stream.getvalue()
    logged = re.findall(r"^(step [36]/6  .*)$", text.replace("\r" + " " * 78 + "\r", "\n"), re.M)
    assert len(logged) == 2 and all("siglip2/spatial" in line for line in logged)
    if not terminal:
        assert "\r" not in text
        return
    bars = re.findall(r"\r(step \d/6 [^\r\n]*)", text)
    assert bars and bars[0].startswith("step 1/6  ") and "[###.................]" in bars[0] and "ETA" in bars[0]
    assert text.count("\r" + " " * 78 + "\r") >= len(logged)  # each logged line clears the bar first


def _train_stopping_at(step: int, cfg, run: Path, monkeypatch) -> None:
    """Train ``cfg`` into ``run`` until an error stops it after ``step`` was logged (the process dying there)."""
    evaluate = Trainer._evaluate

    def stop(self):
        if self.step == step:
            raise RuntimeError("stopped")
        return evaluate(self)

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "_evaluate", stop)
        with pytest.raises(RuntimeError, match="stopped"):
            train(cfg, run)


def test_tensorboard_holds_every_logged_scalar_of_metrics_jsonl_and_resume_adds_to_it(cache_root, config_file,
                                                                                         tmp_path, monkeypatch):
    """``log.tensorboard = true``: the event files under RUN/tensorboard, read by TensorBoard's own reader, hold
    each number of each metrics.jsonl record at its step; a run stopped at step 3 (its checkpoint at 2) and
    resumed leaves TensorBoard the resumed values, as metrics.jsonl has them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    cfg = config.load(config_file, cache=cache_root, overrides=["log.tensorboard=true", "optim.steps=4",
                                                                "eval.every=2", "checkpoint_every=2"])
    _train_stopping_at(3, cfg, run, monkeypatch)
    train(None, run, resume=True)
    want = {(k, r["step"]): v for r in _records(run) for k, v in r.items() if k != "step"}
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)  # the stopped run's step 3 was purged, not kept twice
        got.update({(tag, e.step): e.value for e in events.Scalars(tag)})
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert ("heldout/dinov3/spatial", 0) in got and ("lr", 4) in got  # the step-0 evaluation, the last step


def test_tensorboard_without_its_package_is_one_line_before_the_run_folder(cache_root, config_file, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    out = tmp_path / "no-tb"
    code = main(["train", cache_root, "--config", str(config_file), "--out", str(out), "--set", "log.tensorboard=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), err
    assert "log.tensorboard needs the tensorboard package" in err and "featcache[tensorboard]" in err


def test_wandb_offline_writes_a_run_whose_history_is_metrics_jsonl(cache_root, config_file, tmp_path, monkeypatch):
    """``log.wandb``: with no W&B credentials the run is logged offline under RUN/wandb (``wandb sync`` uploads it
    later); its history holds each metrics.jsonl number at its step; the run id is kept for a resume."""
    from tests.support.wandb_records import history

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "NOT-IN-ANY-RUN-FILE")  # a credential in the environment
    run = tmp_path / "wb"
    train(config.load(config_file, cache=cache_root, overrides=[
        'log.wandb={project="featcache-test", name="wb"}', "optim.steps=2", "eval.every=2"]), run)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stem == "run-" + (run / "wandb" / "run-id").read_text().strip(), files
    rows = history(files[0])
    got = {(k, r["_step"]): v for r in rows for k, v in r.items() if not k.startswith("_")}
    want = {(k, r["step"]): v for r in _records(run) for k, v in r.items() if k != "step"}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert not [p for p in run.rglob("*") if p.is_file() and b"NOT-IN-ANY-RUN-FILE" in p.read_bytes()]


@pytest.mark.parametrize("value, says", [
    ('{project="p", api_key="secret"}', "log.wandb: unknown key(s) api_key; known: project, entity, name, group, tags, mode"),
    ('{name="x"}', "log.wandb needs a project"),
    ('{project="p", mode="sometimes"}', "log.wandb mode must be 'online', 'offline' or 'disabled', not 'sometimes'"),
])
def test_bad_wandb_settings_are_one_line_before_the_run_folder(cache_root, config_file, tmp_path, capsys, value, says):
    out = tmp_path / "bad-wb"
    code = main(["train", cache_root, "--config", str(config_file), "--out", str(out), "--set", f"log.wandb={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists() and says in err, err
    assert "secret" not in err


def test_wandb_without_its_package_is_one_line(cache_root, config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["train", cache_root, "--config", str(config_file), "--out", str(tmp_path / "r"), "--set",
                 'log.wandb={project="p"}'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'featcache[wandb]'" in err, err


def test_a_run_started_over_before_its_first_checkpoint_drops_its_tensorboard_and_wandb_files(
        cache_root, config_file, tmp_path, monkeypatch):
    """A folder a start left without a checkpoint is taken over: its event files and W&B run go with its metrics,
    so TensorBoard does not show the abandoned steps beside the new ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run = tmp_path / "over"
    cfg = config.load(config_file, cache=cache_root, overrides=[
        "log.tensorboard=true", 'log.wandb={project="featcache-test"}', "optim.steps=2", "eval.every=2",
        "checkpoint_every=2"])
    _train_stopping_at(1, cfg, run, monkeypatch)
    old_id = (run / "wandb" / "run-id").read_text()
    train(cfg, run)  # the same command again: the folder has no checkpoint, so it is started over
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("lr")] == [1, 2]
    assert (run / "wandb" / "run-id").read_text() != old_id and len(list((run / "wandb").glob("offline-run-*"))) == 1
