"""The student's input pixels: crop geometry on a ramp (every output pixel is the source at the centre
of its footprint), the same through a JPEG decoded at 1/2 and 1/4 of its size in the DCT, the
reduction chosen for a crop, and the normalization the training device applies."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.decode import decode_rgb
from featcache.train.data import MEAN, STD, crop_pixels, normalize, reduction

W, H = 256, 192


def ramp(fmt: str) -> bytes:
    """Red = x, green = y (one level per pixel), blue constant."""
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    buf = io.BytesIO()
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)).save(
        buf, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt, reduce, scale, bound", [("PNG", 4, 1, 0.5), ("JPEG", 1, 1, 0.75),
                                                       ("JPEG", 2, 2, 1.25), ("JPEG", 4, 4, 1.5)])
@pytest.mark.parametrize("flip", [False, True])
def test_each_pixel_is_the_source_at_its_footprint_centre(fmt, reduce, scale, bound, flip):
    """A value v at pixel centre v + 0.5 is the linear field u - 0.5, which the (antialiasing) bilinear
    filter keeps; half a reduced pixel off at 1/4 size would be 2 levels off."""
    image, s = decode_rgb(ramp(fmt), "ramp", reduce=reduce)
    assert s == scale and image.size == (W // s, H // s)
    box, (h, w) = (30.3, 20.7, 230.1, 170.2), (24, 32)
    got = crop_pixels(image, box, (h, w), flip, s).numpy().astype(np.float64)
    assert got.shape == (3, h, w)
    u = box[0] + (np.arange(w) + 0.5) * (box[2] - box[0]) / w - 0.5
    v = box[1] + (np.arange(h) + 0.5) * (box[3] - box[1]) / h - 0.5
    red = got[0, :, ::-1] if flip else got[0]
    inner = (slice(2, -2), slice(2, -2))  # the filter's support inside the image
    assert np.abs(red - u[None, :])[inner].max() <= bound
    assert np.abs(got[1] - v[:, None])[inner].max() <= bound
    assert np.abs(red - u[None, :])[inner].mean() < 0.5


def test_a_box_past_the_edge_by_rounding_is_clipped_and_one_outside_refused():
    image, _ = decode_rgb(ramp("PNG"), "ramp")
    assert crop_pixels(image, (-1e-9, 0, W + 1e-9, H), (12, 16)).shape == (3, 12, 16)
    from featcache.errors import UsageError
    with pytest.raises(UsageError, match="lies outside"):
        crop_pixels(image, (W + 1, 0, W + 9, H), (12, 16))


@pytest.mark.parametrize("boxes, size, want", [
    ([(0, 0, 224, 224)], (224, 224), 1), ([(0, 0, 447, 500)], (224, 224), 1), ([(0, 0, 448, 500)], (224, 224), 2),
    ([(10, 10, 1000, 1000)], (224, 224), 4), ([(0, 0, 4000, 3000)], (224, 224), 8),
    ([(0, 0, 900, 900), (0, 0, 460, 900)], (224, 224), 2), ([(0, 0, 100, 100)], (224, 224), 1)])
def test_the_reduction_leaves_every_box_at_least_the_output_size(boxes, size, want):
    assert reduction(boxes, size) == want


def test_normalize_is_the_student_s_float_input():
    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    want = (pixels.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    got = normalize(pixels)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)
