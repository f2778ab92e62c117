"""Full-size presets on the meta device: parameter counts and FLOPs against the published figures."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from featcache.cli import main
from featcache.teachers.presets import PRESETS

PARAMS = {"siglip2-g-384": 1.16e9, "dinov3-7b": 6.72e9, "sam3": 446e6}
# ALGORITHMS.md §8 reference forward FLOPs per image: (preset, size) -> TFLOP
REFERENCE = {("siglip2-g-384", 384): 1.39, ("dinov3-7b", 224): 2.72, ("dinov3-7b", 512): 14.5,
             ("dinov3-7b", 1024): 66.1, ("sam3", 1008): 5.4}


@pytest.fixture(scope="module")
def meta_models():
    return {name: p.build_meta() for name, p in PRESETS.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_counts(name, meta_models):
    count = sum(p.numel() for p in meta_models[name].parameters())
    assert abs(count / PARAMS[name] - 1) < 0.01, count


@pytest.mark.parametrize("name,size", REFERENCE)
def test_flops_match_the_reference_and_the_counter(name, size, meta_models):
    analytic = PRESETS[name].flops(size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_models[name](pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    counted = counter.get_total_flops()
    assert abs(analytic / counted - 1) < 0.01, (analytic, counted)
    assert abs(analytic / 1e12 / REFERENCE[(name, size)] - 1) < 0.01


def test_teachers_command_lists_the_presets(capsys):
    assert main(["teachers"]) == 0
    out = capsys.readouterr().out
    for name, p in PRESETS.items():
        assert name in out and p.source in out
    assert "1.39" in out and "6.72 B" in out


def test_random_teacher_builds_the_preset_family_with_its_spec():
    from featcache.roofline import VitShape
    from featcache.teachers.presets import Preset
    from tests.support.teachers import DINOV3

    tiny = Preset("dinov3-tiny", "dinov3", "nowhere/dinov3-tiny", 64, DINOV3, VitShape(32, 64, 2, 16, gated=True), 32)
    teacher = tiny.random_teacher("cpu")
    assert teacher.spec.source == "random:dinov3-tiny" and teacher.spec.weights_hash is None
    assert teacher.spec.prefix_tokens == 5 and teacher.spec.grid() == (4, 4)
    out = teacher.extract(torch.randn(2, 3, 64, 64))
    assert out.dense.shape == (2, 4, 4, 32) and out.summary.shape == (2, 32)
