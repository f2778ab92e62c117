"""The training step as one task (issue 24): a seeded run logs exactly the losses the loop logged before
the step moved into :class:`featcache.train.task.DistillTask` (recorded in ``data/distill_metrics.json``),
and a new loss is one registered function and one config entry.

Regenerate the record (only when a change of the numbers is intended) with
``python -m tests.test_train.test_task``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from featcache.cli import main
from featcache.train import config, train
from featcache.train.data import collate
from featcache.errors import UsageError
from featcache.train.losses import register_loss
from featcache.train.loop import Trainer, due
from tests.support import training
from tests.test_train.test_loop import CONFIG, cache_root  # noqa: F401 (fixture: this module's own copy)

pytestmark = pytest.mark.slow

RECORD = Path(__file__).parent / "data" / "distill_metrics.json"
#: Every loss term, DAMP, MESA from step 2, drop-path (the global RNG), accumulation, both partitions, free
#: and mirrored crops, held-out losses and pictures every 3 steps, on the CPU so any machine computes the same
#: numbers. (Re-recorded when the defaults became the parity recipe: summary weight 0.03.)
SEEDED = ["optim.steps=6", "optim.accumulate=2", "loss.mesa_start=2", "student.drop_path=0.1", "eval.every=3",
          "log_every=1", "checkpoint_every=3", 'device="cpu"', "crop.aligned_prob=0.5", "crop.flip_prob=0.5"]
TIMING = ("samples_per_s", "bytes_read_per_s")  # wall-clock rates: the only fields allowed to differ


def _seeded_metrics(cache: str, run: Path) -> list[dict]:
    cfg_file = run.parent / "train.toml"
    cfg_file.write_text(CONFIG)
    train(config.load(cfg_file, cache=cache, overrides=SEEDED), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_a_seeded_run_logs_the_losses_recorded_before_the_task(cache_root, tmp_path):
    got, want = _seeded_metrics(cache_root, tmp_path / "run"), json.loads(RECORD.read_text())["records"]
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (w["step"], k)


@register_loss("test_cosine", per_teacher=True)
def cosine_term(step, target):
    """A loss only this test knows: 1 − cos(student, teacher) of the dense features, mean over Ω."""
    pred, want = step.out.dense[target.name].float(), torch.nan_to_num(step.targets(target))
    omega = step.batch[target.name]["omega"].float()
    return ((1 - F.cosine_similarity(pred, want, dim=-1)) * omega).sum() / omega.sum().clamp_min(1)


SHORT = ["optim.steps=3", "eval.every=3", "log_every=1", "eval.pictures=false", 'device="cpu"']


def _short_run(cache: str, folder: Path, extra: list[str]) -> list[dict]:
    (folder / "train.toml").write_text(CONFIG)
    train(config.load(folder / "train.toml", cache=cache, overrides=SHORT + extra), folder / "run")
    return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_loss_registered_in_a_test_trains_with_the_weight_its_config_entry_gives(cache_root, tmp_path):
    (tmp_path / "with").mkdir(), (tmp_path / "without").mkdir()
    got = _short_run(cache_root, tmp_path / "with", ["loss.terms={test_cosine=0.5}"])
    plain = _short_run(cache_root, tmp_path / "without", [])
    assert [r["step"] for r in got] == [0, 1, 2, 3, 3]  # step 0's evaluation, three steps, the last evaluation
    for record in got:
        prefix = "" if "lr" in record else "heldout/"
        for teacher in ("siglip2", "dinov3", "sam3"):
            assert 0 < record[f"{prefix}{teacher}/test_cosine"] < 2, record
    assert all("test_cosine" not in key for record in plain for key in record)
    assert got[1]["dinov3/spatial"] == plain[1]["dinov3/spatial"]  # the first batch: the same weights
    assert got[2]["dinov3/spatial"] != plain[2]["dinov3/spatial"]  # its gradient moved them differently
    saved = config.load(tmp_path / "with" / "run" / "config.toml")
    assert saved.loss.terms == {"test_cosine": 0.5}  # the run folder's config reads back, for --resume


def test_the_task_returns_its_loss_as_the_weighted_sum_of_its_terms(cache_root, tmp_path):
    (tmp_path / "train.toml").write_text(CONFIG)
    cfg = config.load(tmp_path / "train.toml", cache=cache_root, overrides=['device="cpu"',
                                                                           "loss.terms={test_cosine=0.5}"])
    trainer = Trainer(cfg, tmp_path / "run")
    task = trainer.task
    weights = {term.key: term.weight for term in task.terms}
    assert weights == {"siglip2/spatial": 1.0, "siglip2/summary": 0.03, "siglip2/test_cosine": 0.5,
                       "dinov3/spatial": 1.0, "dinov3/summary": 0.03, "dinov3/test_cosine": 0.5,
                       "sam3/spatial": 0.5, "sam3/summary": 0.03, "sam3/test_cosine": 0.5, "mesa": 0.5}
    batch = collate([task.dataset[item] for item in trainer.plan.batch(0)])
    values = task.forward(batch, 0)
    loss = values.pop("loss")
    assert list(values) == list(weights)  # teacher by teacher, then per batch
    assert float(loss.detach()) == pytest.approx(sum(weights[k] * v for k, v in values.items()), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in task.student.parameters() if p.requires_grad)
    with task.evaluating():
        held_out = task.forward(batch, None)  # an evaluation batch: no MESA
    assert set(held_out) == {"loss"} | set(weights) - {"mesa"} and task.student.training


@pytest.mark.parametrize("value, message", [
    ("{nope=1}", "loss.terms: unknown loss 'nope'; known: mesa, spatial, summary, test_cosine"),
    ("{mesa=1}", "loss.terms: the weight of mesa is set by loss.mesa, not here"),
    ("{test_cosine=-1}", "loss.terms: the weight of test_cosine must be a number >= 0, not -1"),
])
def test_a_bad_loss_entry_is_a_one_line_error(cache_root, tmp_path, capsys, value, message):
    (tmp_path / "train.toml").write_text(CONFIG)
    code = main(["train", cache_root, "--config", str(tmp_path / "train.toml"), "--out", str(tmp_path / "r"),
                 "--set", f"loss.terms={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"featcache: error: {message}"] and not (tmp_path / "r").exists()


def test_every_periodic_action_is_due_at_step_0_every_n_steps_and_at_the_last():
    assert [s for s in range(11) if due(s, 4, 10)] == [0, 4, 8, 10]
    assert [s for s in range(4) if due(s, 1, 3)] == [0, 1, 2, 3]


def test_a_loss_name_is_registered_once():
    with pytest.raises(UsageError, match="cannot register loss 'spatial'"):
        register_loss("spatial")(cosine_term)
    with pytest.raises(UsageError, match="cannot register loss 'loss'"):
        register_loss("loss")(cosine_term)


def _record() -> None:
    """Write ``RECORD`` from a run of the code as it stands."""
    base = Path(tempfile.mkdtemp())
    cache = base / "cache"
    training.build(cache, training.photos(base / "photos"), training.teachers(base / "models"))
    (base / "r").mkdir()
    records = _seeded_metrics(str(cache), base / "r" / "run")
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"overrides": SEEDED, "records": records}, indent=1) + "\n")
    print(f"{len(records)} records written to {RECORD}", file=sys.stderr)


if __name__ == "__main__":
    _record()
