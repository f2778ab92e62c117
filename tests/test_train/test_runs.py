"""One config loader and one run folder for both trainers (``featcache train``, ``featcache featsharp
train``): every test runs over both. The same ``--set`` syntax and the same one-line error for a value
of the wrong type or an unknown key; YAML and TOML files alike; the same folder layout; the same
resume rules (featcache.configfile, featcache.runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from featcache.cli import main
from featcache.runs import CONFIG, METRICS
from featcache.train import config as train_config
from featcache.upsample import settings as featsharp_settings
from tests.test_train.test_loop import CONFIG as TRAIN_TOML
from tests.test_train.test_loop import cache_root, config_file  # noqa: F401 (fixtures: this module's own copies)
from tests.test_upsample.conftest import one_torch_thread, patch_local_dir, photo_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@dataclass
class Trainer:
    """How a test drives one trainer from the command line."""

    name: str
    argv: list[str]  # a new run's arguments before --out (a small run, its config from a file)
    steps_key: str  # the key of the run's length, as --set takes it
    config: dict  # the config file's content

    def new(self, run: Path, *more: str) -> list[str]:
        return [*self.argv, "--out", str(run), *more]

    def resume(self, run: Path, *more: str) -> list[str]:
        return [*self.argv[:2 if self.name == "featsharp" else 1], "--out", str(run), "--resume", *more]


def _write(folder: Path, data: dict, ext: str) -> Path:
    path = folder / f"config.{ext}"
    path.write_text(yaml.safe_dump(data) if ext == "yaml" else _toml(data))
    return path


def _toml(data: dict) -> str:
    from featcache.configfile import to_toml

    return to_toml(data)


@pytest.fixture(params=["train", "featsharp"])
def trainer(request, tmp_path) -> Trainer:
    """Each trainer with a YAML config file for a one-step run."""
    if request.param == "train":
        cache = request.getfixturevalue("cache_root")
        data = {**train_config.load(request.getfixturevalue("config_file"), cache=cache).to_dict()}
        data["optim"] = {**data["optim"], "steps": 1}
        data["loss"] = {**data["loss"], "mesa": 0.0}
        path = _write(tmp_path, data, "yaml")
        return Trainer("train", ["train", "--config", str(path)], "optim.steps", data)
    data = {"family": "dinov3", "source": str(request.getfixturevalue("patch_local_dir")),
            "images": str(request.getfixturevalue("photo_dir")), "steps": 1, "batch_size": 2, "heads": 4,
            "stats_images": 4, "warmup": 1}
    path = _write(tmp_path, data, "yaml")
    return Trainer("featsharp", ["featsharp", "train", "--config", str(path)], "steps", data)


def _cli(args: list[str], capsys) -> tuple[int, list[str]]:
    with one_torch_thread():
        code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def _error(args: list[str], capsys) -> str:
    code, err = _cli(args, capsys)
    assert code == 2 and err and err[-1].startswith("featcache: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.parametrize("value, shown, typename", [("five", "'five'", "an int"), ("3e-4x", "'3e-4x'", "an int"),
                                                    ("1.5", "1.5", "an int"), ("null", "None", "an int"),
                                                    ("[1, 2]", "[1, 2]", "an int")])
def test_a_set_value_of_the_wrong_type_is_the_same_error_naming_key_value_and_type(trainer, tmp_path, capsys,
                                                                                 value, shown, typename):
    run = tmp_path / "run"
    says = _error(trainer.new(run, "--set", f"{trainer.steps_key}={value}"), capsys)
    assert says.endswith(f": {trainer.steps_key.split('.')[-1]} = {shown} is not {typename}"), says
    assert not run.exists()


def test_an_unknown_key_is_refused_listing_the_known_ones(trainer, tmp_path, capsys):
    says = _error(trainer.new(tmp_path / "run", "--set", "warmup_step=5"), capsys)
    assert "unknown key(s) warmup_step; known: " in says and "seed" in says.split("known: ")[1], says


def test_yaml_and_toml_files_give_the_same_config(trainer, tmp_path):
    """The file each CLI reads, in either format, is the same config (and a .json is refused)."""
    load = (lambda p: train_config.load(p)) if trainer.name == "train" else \
        (lambda p: featsharp_settings.settings_from(None, None, {}, [], str(p)))
    as_yaml, as_toml = (load(_write(tmp_path, trainer.config, ext)) for ext in ("yaml", "toml"))
    assert as_yaml.to_dict() == as_toml.to_dict()
    assert as_yaml.to_dict()["seed"] == trainer.config.get("seed", 0) and as_yaml.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(trainer.config))
    with pytest.raises(Exception, match="config files are .toml, .yaml or .yml"):
        load(tmp_path / "config.json")


def test_both_write_the_same_layout_and_follow_the_same_resume_rules(trainer, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _cli(trainer.new(run), capsys)  # from the YAML file
    assert code == 0, err
    assert {CONFIG, METRICS, "checkpoints"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last" / "current.json").is_file()
    assert [json.loads(x)["step"] for x in (run / METRICS).read_text().splitlines() if '"lr"' in x] == [1]
    saved = (train_config.load if trainer.name == "train" else featsharp_settings.load)(run / CONFIG)
    assert saved.to_dict()["seed"] == trainer.config.get("seed", 0)
    kind = "a FeatSharp run" if trainer.name == "featsharp" else "a run"
    assert f"already holds {kind}: --resume to continue it, or choose another --out" in _error(trainer.new(run), capsys)
    assert "already finished its 1 steps" in _error(trainer.resume(run), capsys)
    assert "already finished its 1 steps" in _error(trainer.resume(run, "--steps", "3"), capsys)
    assert "holds no " in _error(trainer.resume(tmp_path / "none"), capsys)
    assert "run to resume (no config.toml)" in _error(trainer.resume(tmp_path / "none"), capsys)


def test_a_folder_without_a_checkpoint_is_taken_over_by_both(trainer, tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(trainer.new(run), capsys)[0] == 0
    for path in (run / "checkpoints").iterdir():  # as a kill before the first checkpoint leaves it
        import shutil

        shutil.rmtree(path)
    (run / METRICS).write_text('{"step": 7, "x": 1.0}\n')
    code, err = _cli(trainer.resume(run), capsys)
    assert code == 0 and any("holds no checkpoint yet: starting its run from step 0" in line for line in err), err
    assert [json.loads(x)["step"] for x in (run / METRICS).read_text().splitlines() if '"lr"' in x] == [1]
    assert "x" not in (run / METRICS).read_text().replace('"lr"', "")
