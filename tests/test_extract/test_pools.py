"""Teacher pools: which teachers share a worker, from the config or from memory estimates."""

from __future__ import annotations

import pytest
import torch

from featcache.errors import UsageError
from featcache.extract import pools
from featcache.extract.config import from_dict
from featcache.teachers import create_teacher, teacher_parameters
from tests.support.teachers import save_dinov3, save_siglip

GIB = 2**30
NAMES = ["siglip2", "dinov3", "sam3"]


def _report_teachers() -> list[pools.Footprint]:
    """The report's three teachers at batch 16: SigLIP2-g@384 (1.14B, 576 tokens, 1536 wide),
    DINOv3-7B@224 (6.7B, 201 tokens, 4096), SAM3@1008 (0.45B, 5184 tokens, 1024)."""
    return [pools.footprint("siglip2", 1_140_000_000, torch.bfloat16, 16, 576, 1536),
            pools.footprint("dinov3", 6_700_000_000, torch.bfloat16, 16, 201, 4096),
            pools.footprint("sam3", 450_000_000, torch.bfloat16, 16, 5184, 1024)]


def test_a_footprint_is_bf16_weights_plus_a_batch_of_activations():
    f = pools.footprint("t", 1000, torch.bfloat16, 4, 10, 8)
    assert f.weights == 2000 and f.activations == 4 * 10 * 8 * pools.ACTIVATION_FACTOR
    assert pools.footprint("t", 1000, torch.float32, 4, 10, 8).weights == 4000


def test_auto_shares_a_large_gpu_and_splits_a_small_share_first_fit_largest_first():
    feet = _report_teachers()
    total = sum(f.total for f in feet)
    assert 17.5 * GIB < total < 18.5 * GIB  # what the three need together
    assert pools.choose("auto", NAMES, feet, 80 * GIB) == [[0, 1, 2]]  # one H100 per worker: together
    # Four workers per 80 GiB GPU: 20 GiB each, 17 GiB of budget. DINOv3-7B (~12.8 GiB) goes first;
    # SAM3 (~2.7 GiB) and SigLIP2 (~2.4 GiB) do not both fit beside it: SAM3, larger, does; SigLIP2
    # opens a second pool.
    assert feet[1].total + feet[2].total < 0.9 * 20 * GIB - pools.CONTEXT_BYTES < total
    assert pools.choose("auto", NAMES, feet, 20 * GIB) == [[0], [1, 2]]
    # A share smaller than any teacher: one pool each (each may still fit after halving its batch).
    assert pools.choose("auto", NAMES, feet, 2 * GIB) == [[0], [1], [2]]


def test_auto_off_cuda_and_the_fixed_settings():
    assert pools.choose("auto", NAMES, None, None) == [[0, 1, 2]]  # CPU workers: host memory, one pool
    assert pools.choose("shared", NAMES, _report_teachers(), 2 * GIB) == [[0, 1, 2]]
    assert pools.choose("separate", NAMES, None, None) == [[0], [1], [2]]
    assert pools.choose([["sam3"], ["dinov3", "siglip2"]], NAMES, None, None) == [[2], [1, 0]]
    assert pools.choose("separate", ["dinov3"], None, None) == [[0]]


@pytest.mark.parametrize("bad, says", [
    ("apart", "teacher_pools 'apart' is not one of auto, shared, separate"),
    ([["dinov3"]], "teacher_pools leaves out 'siglip2'"),
    ([["dinov3", "siglip2"], ["dinov3"]], "teacher_pools names 'dinov3' twice"),
    ([["dinov3", "siglip2", "clip"]], "teacher_pools names 'clip', which is not a teacher of this job"),
    ([[]], "teacher_pools must be one of auto, shared, separate or a list of non-empty lists"),
    (3, "teacher_pools must be"),
])
def test_a_bad_teacher_pools_setting_is_one_line_naming_it(bad, says):
    job = {"output": "/tmp/x", "teacher_pools": bad,
           "teachers": [{"family": "dinov3", "source": "a"}, {"family": "siglip2", "source": "b"}]}
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        from_dict(job)


def test_parameters_are_counted_from_the_config_alone(tmp_path):
    for family, save in (("dinov3", save_dinov3), ("siglip2", save_siglip)):
        folder = str(save(tmp_path / family)[0])
        loaded = create_teacher(family, folder).model
        assert teacher_parameters(family, folder) == sum(p.numel() for p in loaded.parameters()) > 1000


def test_the_line_a_job_says():
    feet = _report_teachers()
    line = pools.describe([[0], [1, 2]], NAMES, feet, 20 * GIB)
    assert line == "2 teacher pools, run in turn on workers of 20.0 GiB: siglip2 (~2.4 GiB); dinov3 + sam3 (~15.5 GiB)"
    assert pools.describe([[0, 1, 2]], NAMES, None, None) == "teachers share each worker: siglip2 + dinov3 + sam3"
