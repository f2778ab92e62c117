"""Student pruning: each pattern's masks against direct computations, and a pruned distillation run
keeps exactly its pattern while the kept weights train."""

from __future__ import annotations

import pytest
import torch

from featcache.errors import UsageError
from featcache.train import config, prune
from featcache.train.loop import train
from featcache.train.weights import load_bare_student
from tests.test_train.test_loop import cache_root, config_file, long_run  # noqa: F401 (fixtures)


def test_masks_of_each_pattern_against_direct_computations():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    m = prune.mask_of(w, "2:4", 0.5)
    groups = w.abs().reshape(8, 4, 4)
    for i in range(8):
        for g in range(4):
            kept = set(torch.nonzero(m.reshape(8, 4, 4)[i, g]).flatten().tolist())
            assert kept == set(groups[i, g].argsort(descending=True)[:2].tolist())
    u = prune.mask_of(w, "unstructured", 0.75)
    assert int(u.sum()) == 32 and w.abs()[u].min() >= w.abs()[~u].max()
    b = prune.mask_of(w, "block", 0.5)
    norms = w.pow(2).reshape(2, 4, 4, 4).sum(dim=(1, 3))  # 2 x 4 tiles of 4 x 4
    kept_tiles = b.reshape(2, 4, 4, 4)[:, 0, :, 0]
    assert int(kept_tiles.sum()) == 4 and norms[kept_tiles].min() >= norms[~kept_tiles].max()
    assert torch.equal(b, kept_tiles.repeat_interleave(4, 0).repeat_interleave(4, 1))


@pytest.mark.parametrize("spec", ["unstructured:1", "block:x", "random:0.5", "2:4:0.75", "unstructured"])
def test_a_bad_prune_setting_is_refused(spec):
    with pytest.raises(UsageError, match="give unstructured:D or block:D"):
        prune.parse(spec)


@pytest.mark.parametrize("spec, density", [("2:4", 0.5), ("unstructured:0.75", 0.25), ("block:0.5", 0.5)])
def test_a_pruned_run_keeps_its_pattern_while_the_kept_weights_train(long_run, cache_root, config_file, tmp_path,
                                                                     spec, density):
    run, _ = long_run
    cfg = config.load(config_file, cache=cache_root, overrides=["optim.steps=3", "eval.every=100", f'prune="{spec}"'])
    out = tmp_path / "pruned"
    train(cfg, out, init=str(run))
    before, after = load_bare_student(run, which="last"), load_bare_student(out, which="last")
    assert prune.density(after) == pytest.approx(density, abs=1e-3)
    masks = prune.masks(before, spec)  # the masks were taken from the --init weights
    for name, layer in prune.block_linears(after).items():
        kept = layer.weight[masks[name]]
        assert not layer.weight[~masks[name]].any() and kept.count_nonzero() == kept.numel()
        assert not torch.equal(kept, prune.block_linears(before)[name].weight[masks[name]])  # they trained
