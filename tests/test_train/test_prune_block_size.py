"""The block size of block pruning comes from the spec (``block8x8:0.75``; ``block:D`` is 4 x 4), as
the roofline models it (issue 23, item 2)."""

from __future__ import annotations

import pytest
import torch

from featcache import roofline
from featcache.errors import UsageError
from featcache.train import prune
from featcache.train.student import StudentConfig, TeacherHead, build_student


def test_the_spec_names_the_block_size():
    assert prune.parse("block8x8:0.75") == roofline.Sparsity("block", 0.75, (8, 8))
    s = prune.parse("block:0.5")
    assert (s.pattern, s.degree, s.block) == ("block", 0.5, (4, 4))


def test_block_masks_of_another_size_against_a_direct_computation():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    m = prune.mask_of(w, "block", 0.5, block=(8, 4))
    norms = w.pow(2).reshape(2, 8, 6, 4).sum(dim=(1, 3))  # 2 x 6 tiles of 8 x 4
    kept = m.reshape(2, 8, 6, 4)[:, 0, :, 0]
    assert int(kept.sum()) == 6 and norms[kept].min() >= norms[~kept].max()
    assert torch.equal(m, kept.repeat_interleave(8, 0).repeat_interleave(4, 1))


def test_a_student_is_pruned_in_the_blocks_it_was_asked_for():
    student = build_student(StudentConfig(size="micro", heads=[TeacherHead("t", 8, 8)]))
    masks = prune.masks(student, "block16x16:0.75")
    for name, mask in masks.items():
        tiles = mask.reshape(mask.shape[0] // 16, 16, mask.shape[1] // 16, 16)
        assert torch.equal(tiles, tiles[:, :1, :, :1].expand_as(tiles)), name  # whole 16 x 16 blocks
        assert mask.float().mean() == pytest.approx(0.25), name


@pytest.mark.parametrize("spec, says", [("block7x7:0.5", "not a multiple of 7x7"),
                                        ("block0x4:0.5", "block size"), ("block4x4:1", "0 < D < 1")])
def test_a_block_size_that_does_not_fit_is_refused_in_one_line(spec, says):
    student = build_student(StudentConfig(size="micro", heads=[TeacherHead("t", 8, 8)]))
    with pytest.raises(UsageError, match=says) as e:
        prune.masks(student, spec)
    assert "\n" not in str(e.value)
