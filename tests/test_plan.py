"""``featcache plan`` and the teachers' roofline shapes: FLOPs of each family's backbone read from its
config against torch's counter, the plan's JSON keys, its arithmetic, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from featcache import estimate, roofline
from featcache.cli import main
from featcache.teachers import create_teacher
from featcache.teachers.base import teacher_shape
from tests.support.teachers import save_dinov3, save_sam3_video_layout, save_siglip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_teachers")
    return {"siglip2": str(save_siglip(root / "s")[0]), "dinov3": str(save_dinov3(root / "d")[0]),
            "sam3": str(save_sam3_video_layout(root / "m")[0])}


@pytest.mark.parametrize("family, size", [("siglip2", 64), ("dinov3", 64), ("dinov3", 128), ("sam3", 112)])
def test_a_teacher_shape_read_from_its_config_counts_the_flops_torch_counts(tiny, family, size):
    """On the meta device (on a CPU, torch's counter does not see the fused attention kernel)."""
    teacher = create_teacher(family, tiny[family])
    shape = teacher_shape(family, tiny[family], prefix_tokens=teacher.spec.prefix_tokens)
    model = teacher.model.to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    assert abs(roofline.vit_flops(shape, size, size) / counter.get_total_flops() - 1) < 0.02


def test_the_plan_s_arithmetic_and_json(tiny, capsys):
    assert main(["plan", "--teacher", f"family=dinov3,source={tiny['dinov3']},resolutions=64+128",
                 "--teacher", f"family=siglip2,source={tiny['siglip2']},codec=int8-phis", "--images", "1000",
                 "--gpus", "2", "--efficiency", "0.5", "--storage-gbps", "1e-6", "--train-samples-per-s", "100",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"images", "views", "total_bytes", "training_read_gbps"} <= set(plan)
    assert [v["key"] for v in plan["views"]] == ["dinov3@64", "dinov3@128", "siglip2@64"]
    for v in plan["views"]:
        assert {"key", "gpu_hours", "bytes", "write_gbps_per_gpu", "bound"} <= set(v) and v["bound"] == "storage"
        assert v["gpu_hours"] == pytest.approx(1000 * v["seconds_per_image"] / 3600)
        assert v["write_gbps_per_gpu"] == pytest.approx(v["bytes"] / 1000 / v["seconds_per_image"] / 1e9)
    d64, d128, s64 = plan["views"]
    # 4x the patches at 128: dense bytes x4 (f16 of 32 channels), per-image FLOPs more than 4x (attention)
    assert d128["bytes"] > 3.5 * d64["bytes"] and d128["flops_per_image"] > 4 * d64["flops_per_image"]
    assert s64["bytes"] < d64["bytes"]  # int8 codes: half the bytes of f16 at the same grid and width
    assert plan["training_read_gbps"] == pytest.approx(100 * sum(v["bytes"] for v in plan["views"]) / 1000 / 1e9)
    assert plan["hours"] == pytest.approx(sum(v["gpu_hours"] for v in plan["views"]) / 2)


def test_efficiency_scales_the_time_and_nothing_else(tiny):
    from featcache.extract.config import from_dict

    job = from_dict({"output": "x", "teachers": [{"family": "dinov3", "source": tiny["dinov3"]}]})
    full, half = (estimate.estimate(job, 100, roofline.HARDWARE["a100"], e) for e in (1.0, 0.5))
    assert half["views"][0]["seconds_per_image"] == pytest.approx(2 * full["views"][0]["seconds_per_image"])
    assert half["total_bytes"] == full["total_bytes"]


@pytest.mark.parametrize("argv, says", [
    (["plan", "--images", "10"], "no teachers: give a job file or --teacher"),
    (["plan", "--teacher", "family=dinov3,source=/nowhere", "--images", "10"], "/nowhere"),
    (["plan", "--teacher", "preset=sam3", "--images", "10", "--device", "tpu"], "unknown device 'tpu'"),
    (["plan", "--teacher", "preset=sam3"], "give --images N"),
])
def test_plan_errors_are_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
