"""View kinds (plain, mosaic, upsampled): the forward the plan's roofline models is the forward the
pool and batch memory estimates count, and the one the teacher runs."""

from __future__ import annotations

import pytest
import torch

from featcache import estimate, roofline
from featcache.extract import limits, pools
from featcache.extract.config import from_dict
from featcache.extract.plan import Plan, ViewTask
from featcache.extract.scheduler import footprint
from featcache.store.spec import ViewSpec
from featcache.teachers import create_teacher, describe_teacher
from featcache.teachers.base import teacher_shape

BATCH = 4


def _view(kind: str, teacher) -> tuple[ViewTask, ViewSpec, dict]:
    """(task, spec, the teacher's config) of a view of ``kind`` of the tiny SigLIP (64 px, patch 16)."""
    g = teacher.grid()
    if kind == "upsampled":  # a 3x upsampler: a 192-px canvas, a 12 x 12 map
        task = {"key": "s-featsharp3x@192", "teacher": 0, "size": [192, 192], "mosaic": 1, "upsampler": "ckpt",
                "factor": 3}
        return ViewTask.from_dict(task), ViewSpec("s-featsharp3x@192", (3 * g[0], 3 * g[1]), teacher.channels,
                                                  teacher.summary_channels, (192, 192), codec="f32"), {"upsampler": "ckpt"}
    if kind == "mosaic":
        task = {"key": "s-mosaic2@32", "teacher": 0, "size": [32, 32], "mosaic": 2}
        return ViewTask.from_dict(task), ViewSpec("s-mosaic2@32", (2, 2), teacher.channels, teacher.summary_channels,
                                                  (32, 32), codec="f32", mosaic=2), {"mosaic": 2}
    task = {"key": "s@64", "teacher": 0, "size": [64, 64], "mosaic": 1}
    return ViewTask.from_dict(task), ViewSpec("s@64", g, teacher.channels, teacher.summary_channels, (64, 64),
                                              codec="f32"), {}


@pytest.fixture(scope="module")
def siglip(job_teachers):
    source = job_teachers["siglip2"]
    spec = describe_teacher("siglip2", source)
    return source, spec, teacher_shape("siglip2", source, None, spec.prefix_tokens)


@pytest.mark.parametrize("kind", ["plain", "mosaic", "upsampled"])
def test_the_plan_and_the_memory_estimate_count_the_same_forward(siglip, kind):
    """The tokens of one forward in ``featcache plan``'s roofline (its qkv projection's rows) times
    the width and the activation factor are the activations the teacher-pool estimate counts."""
    source, teacher, shape = siglip
    task, spec, extra = _view(kind, teacher)
    _, model, _ = estimate.forward_flops_and_ops(shape, task, spec, teacher, BATCH, 2)
    modelled = next(o for o in model if o.kind == "qkv").linear[0]
    config = from_dict({"output": "x", "batch_size": BATCH, "teachers": [{"family": "siglip2", "source": source,
                                                                          **extra}]})
    estimated = footprint(Plan(config, None, [teacher], [task], 1, 1), 0)
    assert estimated.activations == modelled * teacher.channels * pools.ACTIVATION_FACTOR


@pytest.mark.parametrize("kind, flops_of, images", [
    ("plain", lambda shape: roofline.vit_flops(shape, 64, 64), BATCH),
    ("mosaic", lambda shape: roofline.vit_flops(shape, 64, 64) / 4, BATCH * 4),  # 4 images share an input
    ("upsampled", lambda shape: roofline.vit_flops(shape, 64, 64) * (1 + 9), BATCH),  # global view + 9 tiles
])
def test_each_kind_costs_what_the_formulas_before_it_said(siglip, kind, flops_of, images):
    """FLOPs per image and the images of a worker batch, as ``featcache plan`` computed them by branching."""
    _, teacher, shape = siglip
    task, spec, _ = _view(kind, teacher)
    flops, _, per_batch = estimate.forward_flops_and_ops(shape, task, spec, teacher, BATCH, 2)
    assert flops == pytest.approx(flops_of(shape), rel=1e-12) and per_batch == images
    assert task.kind.images_per_batch(BATCH) == images
    assert limits.forward_tokens(teacher, [task]) == 4 * 4 + teacher.prefix_tokens  # all at the native 64 px


def _forwards(teacher) -> list[int]:
    """Record the inputs of each forward ``teacher`` runs from now on (its one forward method, wrapped)."""
    sizes, run = [], teacher._run
    teacher._run = lambda pixels, *args, **kw: sizes.append(len(pixels)) or run(pixels, *args, **kw)
    return sizes


@pytest.mark.parametrize("kind", ["plain", "mosaic", "upsampled"])
def test_the_teacher_runs_the_forwards_its_kind_counts(siglip, kind):
    """The forwards a batch of a view runs in the real teacher are those its kind tells the estimates."""
    from featcache.upsample import run

    source, spec, _ = siglip
    teacher = create_teacher("siglip2", source)
    task, _, _ = _view(kind, spec)
    want = task.kind.forward(spec, BATCH)
    images = [torch.randint(0, 256, (3, 40 + i, 50), dtype=torch.uint8) for i in range(want.images)]
    pixels, boxes = task.kind.views(spec, images, "squash", "cpu")
    sizes = _forwards(teacher)
    if kind == "upsampled":  # the upsampler's teacher calls, without a trained model
        run.teacher_maps(teacher, pixels, task.factor, BATCH)
    else:
        dense, _ = task.kind.features(teacher, pixels, None, BATCH)
        assert dense.shape[0] == want.images == len(boxes)
    assert sizes == [want.inputs] * want.count
