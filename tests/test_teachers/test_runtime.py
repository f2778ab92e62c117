"""Runtime options: the out-of-memory back-off and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from featcache.teachers.views import make_views
from featcache.teachers import create_teacher
from featcache.teachers.base import TeacherOutput, run_in_batches
from tests.test_teachers.test_contract import _photos


class _Device:
    """A forward that runs out of memory above ``limit`` images, the way a GPU does."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, []

    def __call__(self, pixels: torch.Tensor, size: int) -> TeacherOutput:
        self.calls.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return TeacherOutput(pixels.mean(dim=(1, 2, 3))[:, None], pixels.permute(0, 2, 3, 1))


def test_out_of_memory_halves_the_batch_until_it_fits():
    pixels = torch.arange(10 * 3 * 2 * 2, dtype=torch.float32).reshape(10, 3, 2, 2)
    device = _Device(limit=3)
    out, used = run_in_batches(device, pixels, 8, backoff=True)
    assert used == 2 and device.calls[:3] == [8, 4, 2]  # 8 fails, 4 fails, then 2 for every batch
    assert device.calls[2:] == [2] * 5
    assert torch.equal(out.dense, pixels.permute(0, 2, 3, 1))  # every image once, in order


def test_out_of_memory_is_raised_when_backoff_is_off_or_one_image_does_not_fit():
    pixels = torch.zeros(4, 3, 2, 2)
    with pytest.raises(torch.OutOfMemoryError):
        run_in_batches(_Device(limit=2), pixels, 4, backoff=False)  # CPU: no back-off
    with pytest.raises(torch.OutOfMemoryError):
        run_in_batches(_Device(limit=0), pixels, 4, backoff=True)


@pytest.mark.slow
def test_compiled_teacher_matches_eager(saved):
    folder = str(saved["dinov3"][0])
    eager = create_teacher("dinov3", folder)
    compiled = create_teacher("dinov3", folder, compile=True)
    pixels, _ = make_views(_photos(2), eager.spec)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    a, b = eager.extract(pixels), compiled.extract(pixels)
    assert counters["stats"]["unique_graphs"] == before + 1  # dynamo really captured the forward
    assert (a.dense - b.dense).abs().max().item() <= 1e-4
    assert (a.summary - b.summary).abs().max().item() <= 1e-4
    # A short last batch (3 images in batches of 2) is padded to the batch the graph was built for:
    # the worker's batch shapes never recompile it.
    three, _ = make_views(_photos(3), eager.spec)
    a, b = eager.extract(three), compiled.extract(three, batch_size=2)
    assert counters["stats"]["unique_graphs"] == before + 1 and b.dense.shape == a.dense.shape
    assert (a.dense - b.dense).abs().max().item() <= 1e-4
