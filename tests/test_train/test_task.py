"""The training step as one task (issue 24): a seeded run logs exactly the losses the loop logged before
the step moved into :class:`featcache.train.task.DistillTask` (recorded in ``data/distill_metrics.json``).

Regenerate the record (only when a change of the numbers is intended) with
``python -m tests.test_train.test_task``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from featcache.train import config, train
from tests.support import training
from tests.test_train.test_loop import CONFIG, cache_root  # noqa: F401 (fixture: this module's own copy)

pytestmark = pytest.mark.slow

RECORD = Path(__file__).parent / "data" / "distill_metrics.json"
#: Every loss term, DAMP, MESA from step 2, drop-path (the global RNG), accumulation, both partitions,
#: held-out losses and pictures every 3 steps, on the CPU so any machine computes the same numbers.
SEEDED = ["optim.steps=6", "optim.accumulate=2", "loss.mesa_start=2", "student.drop_path=0.1", "eval.every=3",
          "log_every=1", "checkpoint_every=3", 'device="cpu"']
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
