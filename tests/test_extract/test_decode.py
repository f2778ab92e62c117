"""Decoding source images: every mode becomes the RGB image a viewer shows, or a one-line reason."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from featcache.decode import decode
from featcache.errors import ImageError
from tests.support.images import ORIENTATION6_PROBES, cases_by_name, photo, write_header_cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return cases_by_name(write_header_cases(tmp_path_factory.mktemp("cases")))


def _decode(case) -> np.ndarray:
    return decode(case.path.read_bytes(), str(case.path)).permute(1, 2, 0).numpy()


def test_rgb_photo_is_unchanged():
    path = photo("astronaut")
    assert np.array_equal(decode(path.read_bytes(), str(path)).permute(1, 2, 0).numpy(),
                          np.asarray(Image.open(path).convert("RGB")))


def test_one_pixel(cases):
    assert _decode(cases["png_1x1"]).tolist() == [[[10, 20, 30]]]


def test_grayscale_is_replicated(cases):
    out = _decode(cases["png_gray"])
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    assert out.shape == (48, 64, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))


def test_16_bit_is_scaled_not_clipped(cases):
    out = _decode(cases["png_gray16"])
    v16 = (np.arange(36 * 48, dtype=np.uint32).reshape(36, 48) * 37 % 65536)
    expected = np.round(v16 * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out.max() > 200  # clipping to 255 would have made most pixels white; truncation, black


def test_alpha_is_composited_on_white(cases):
    out = _decode(cases["png_rgba"]).astype(np.float64)
    alpha = (np.arange(50) * 5 / 255.0)[None, :]
    assert np.abs(out[..., 0] - (200 * alpha + 255 * (1 - alpha))).max() <= 1
    assert np.abs(out[..., 1] - 255 * (1 - alpha)).max() <= 1


def test_palette_is_looked_up(cases):
    out = _decode(cases["png_palette"])
    idx = (np.arange(17 * 33).reshape(17, 33) % 16)
    lut = np.array([(i * 16, 255 - i * 16, (i * 64) % 256) for i in range(16)], dtype=np.uint8)
    assert np.array_equal(out, lut[idx])


def test_cmyk_becomes_rgb(cases):
    out = _decode(cases["jpeg_cmyk"])
    assert out.shape == (16, 24, 3)
    assert np.array_equal(out, np.asarray(Image.open(cases["jpeg_cmyk"].path).convert("RGB")))


def test_exif_orientation_is_applied(cases):
    out = _decode(cases["jpeg_exif_orientation6"])
    assert out.shape == (40, 30, 3)  # displayed 30 wide, 40 high
    for (x, y), colour in ORIENTATION6_PROBES.items():
        assert np.abs(out[y, x].astype(int) - colour).max() < 40, (x, y)


@pytest.mark.parametrize("name, reason", [
    ("png_bomb_20000", r"20000x20000 is 400.0 MP, over the 179.0 MP limit"),
    ("png_header_only_30000", r"30000x30000 is 900.0 MP"),
    ("jpeg_corrupt_body", r"cannot decode: OSError"),
    ("png_truncated_half", r"cannot decode: OSError: image file is truncated"),
    ("jpeg_empty", r"empty file \(0 bytes\)"),
    ("jpeg_text", r"not a readable image \(header is none of JPEG, PNG"),
])
def test_bad_images_give_one_line_reasons(cases, name, reason):
    tracemalloc.start()
    with pytest.raises(ImageError, match=reason) as info:
        _decode(cases[name])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "\n" not in info.value.reason
    assert peak < 64 << 20  # the bombs are refused before a pixel is allocated
