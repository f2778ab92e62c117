"""Reading a cache shard by shard (issue 26, ``data.read = "shards"``): every training row once per epoch across the
ranks, a resumed run continues the same order, the whole objects give the windows ranged reads give, and on the
SeaweedFS server a run reads its shards whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache import configfile
from featcache.train import config, train
from featcache.train.data import CacheDataset, ShardPlan
from featcache.train.loop import Trainer
from tests.test_train.test_loop import LOSS_KEYS, _losses, _train_stopping_at, config_file  # noqa: F401

ROWS = np.array([r for r in range(100) if r % 7])  # 85 rows in 13 shards of 8 (some rows missing: failed, held out)


@pytest.fixture(scope="module")
def cache_root(training_cache) -> str:
    """The session's training cache (the one test_loop builds for itself; this module only reads it)."""
    return str(training_cache)


def _plan(rank: int = 0, world: int = 1, buffer: int = 3, batch: int = 6) -> ShardPlan:
    return ShardPlan(ROWS, 8, batch, 11, [64], [], 0.0, rank, world, buffer)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_deals_every_row_once_across_the_ranks(world):
    for epoch in (0, 1):
        seen = np.concatenate([np.concatenate(_plan(r, world).groups(epoch)) for r in range(world)])
        assert sorted(seen) == sorted(ROWS)
    first = [np.concatenate(_plan(r, world).groups(0)) for r in range(world)]
    again = [np.concatenate(_plan(r, world).groups(1)) for r in range(world)]
    assert any(not np.array_equal(a, b) for a, b in zip(first, again))  # a new order each epoch


def test_a_rank_s_batches_walk_its_epochs_and_stay_within_its_shard_groups():
    plan = _plan(rank=1, world=2, buffer=2)
    length = sum(len(g) for g in plan.groups(0))
    steps = -(-length // plan.n) + 3
    rows = [item.row for step in range(steps) for item in plan.batch(step)]
    assert rows[:length] == list(np.concatenate(plan.groups(0)))  # epoch 0, then on into epoch 1 without a gap
    assert rows[length:] == list(np.concatenate(plan.groups(1)))[:len(rows) - length]
    for step in range(steps):
        assert len({item.row // 8 for item in plan.batch(step)}) <= 2 * plan.buffer
        assert [item.seed[2] for item in plan.batch(step)] == [3, 4, 5]  # their places in the global batch


def test_a_resumed_plan_continues_the_same_order_mid_epoch():
    walked = _plan(world=2)
    order = [[item.row for item in walked.batch(step)] for step in range(30)]
    fresh = _plan(world=2)  # a resumed run's plan starts at step 17
    assert [[item.row for item in fresh.batch(step)] for step in range(17, 30)] == order[17:]


def test_ahead_names_the_shards_of_the_next_group():
    plan = _plan(buffer=3)
    groups = plan.groups(0)
    assert [r // 8 for r in plan.ahead(0, groups=1)] == plan.shards_of(0)[3:6]
    assert sorted(r // 8 for r in plan.ahead(0, groups=1)) == sorted({int(r) // 8 for r in groups[1]})
    assert [r // 8 for r in plan.ahead(0)] == plan.shards_of(0)[3:9]


@pytest.mark.slow
def test_shard_reads_give_the_windows_ranged_reads_give(cache_root, config_file):
    cfg = config.load(config_file, cache=cache_root, overrides=['data.read="shards"', "data.shard_buffer=2"])
    trainer = Trainer(cfg, "unused")
    assert isinstance(trainer.plan, ShardPlan)
    ranged = CacheDataset(trainer.cache.root.uri, {t.name: t.views for t in trainer.targets}, cfg.patch, cfg.crop,
                          cfg.data.space, mesa=True)
    for step in (0, 1, 5):
        items = trainer.plan.batch(step)
        whole, expected = trainer.dataset.__getitems__(items), ranged.__getitems__(items)
        for name in ("siglip2", "dinov3", "sam3"):
            assert torch.equal(whole[name]["window"], expected[name]["window"])
            assert torch.equal(whole[name]["summary"], expected[name]["summary"])
        assert torch.equal(whole["image"], expected["image"])
    assert sum(trainer.dataset.reader(k)._ranges.fetched for k in trainer.dataset.views.keys) > 0


@pytest.mark.slow
def test_a_shard_sequential_run_resumes_with_the_uninterrupted_losses(cache_root, config_file, tmp_path,
                                                                      monkeypatch):
    cfg = config.load(config_file, cache=cache_root, overrides=['data.read="shards"', "data.shard_buffer=2"])
    whole = tmp_path / "whole"
    train(cfg, whole)
    assert config.load(whole / "config.toml").data.read == "shards"
    stopped = tmp_path / "stopped"
    _train_stopping_at(6, cfg, stopped, monkeypatch)
    train(None, stopped, resume=True)
    a, b = _losses(whole), _losses(stopped)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        for k in LOSS_KEYS:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-9), (step, k)


def test_shards_that_do_not_fit_in_memory_are_refused_before_any_read(cache_root, config_file, tmp_path):
    from featcache.errors import UsageError

    cfg = config.load(config_file, cache=cache_root, overrides=['data.read="shards"', "data.shard_buffer=1000000"])
    with pytest.raises(UsageError, match=r"data.shard_buffer 1000000 holds 3000000 whole shards of each of 4 view\(s\) "
                                         r"at once in each loader process, \d+\.\d GiB, but this machine has"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_saved_before_shard_reading_resumes_reading_windows(tmp_path):
    """Its config.toml has no data.read (it read windows, the only way then): resumed from a cache on an object
    store, where "auto" now reads shards, it must keep reading windows, or its batches would change mid-run."""
    from featcache.runs import RunFolder
    from featcache.train.loop import _plan

    cfg = config.load(None, cache="s3://bucket/cache", overrides=['teachers=[{name="d", low="d@64"}]'])
    saved = cfg.to_dict()
    del saved["data"]["read"]
    (tmp_path / "config.toml").write_text(configfile.to_toml(saved))
    assert config.load(tmp_path / "config.toml").data.read == "auto"
    assert _plan(RunFolder(tmp_path), None, True)[0].data.read == "windows"
