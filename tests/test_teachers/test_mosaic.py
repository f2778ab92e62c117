"""SAM3 mosaic: k x k images in one native-size input, features split back per tile.

Ground truth: with a patch-local teacher (no attention, so a patch's features depend only on its own
pixels) every tile's mosaic features equal the tile's features computed alone. For the real SAM3
trunk (global attention: tiles do see each other) the split is checked against a mosaic composed by
hand with ``torch.cat`` and run through the ordinary ``extract``.
"""

from __future__ import annotations

import pytest
import torch

from featcache.errors import UsageError
from featcache.teachers.views import make_views, view_box
from featcache.teachers import create_teacher
from tests.support.teachers import save_patch_local
from tests.test_teachers.test_contract import _photos


@pytest.fixture(scope="module")
def patch_local(tmp_path_factory):
    folder, _ = save_patch_local(tmp_path_factory.mktemp("patch_local") / "model")
    return create_teacher("dinov3", str(folder), name="local")


@pytest.mark.parametrize("k", [2, 4])
def test_patch_local_tile_features_equal_the_tile_alone(patch_local, k):
    images = _photos(5)  # 5 tiles: one full 2x2 mosaic and one padded; for k=4 a single padded mosaic
    tiles, boxes = make_views(images, patch_local.spec, mosaic=k)
    assert tuple(tiles.shape[-2:]) == patch_local.spec.mosaic_tile(k) == (64 // k, 64 // k)
    out = patch_local.extract_mosaic(tiles, k)
    gh = 64 // k // 16
    assert out.dense.shape == (5, gh, gh, patch_local.spec.channels)
    for i in range(5):
        alone = patch_local.extract(tiles[i:i + 1])
        assert (out.dense[i] - alone.dense[0]).abs().max().item() <= 1e-5, f"tile {i}"
        assert torch.allclose(out.summary[i], alone.dense[0].mean(dim=(0, 1)), atol=1e-5)
        assert boxes[i].tolist() == list(view_box(images[i].shape[-1], images[i].shape[-2]))
    # the tiles are different images, so a mix-up of the split would not go unseen
    assert (out.dense[0] - out.dense[1]).abs().max().item() > 0.1


def test_sam3_mosaic_equals_a_hand_composed_mosaic(teachers):
    sam3 = teachers["sam3"]
    tiles, _ = make_views(_photos(5), sam3.spec, mosaic=2)
    assert tuple(tiles.shape[-2:]) == (56, 56)
    out = sam3.extract_mosaic(tiles, 2, batch_size=1)
    padded = torch.cat([tiles, torch.zeros(3, *tiles.shape[1:])])
    for m in range(2):
        t = padded[4 * m:4 * m + 4]
        composed = torch.cat([torch.cat([t[0], t[1]], dim=2), torch.cat([t[2], t[3]], dim=2)], dim=1)
        dense = sam3.extract(composed[None]).dense[0]  # (8, 8, C)
        quads = [dense[:4, :4], dense[:4, 4:], dense[4:, :4], dense[4:, 4:]]
        for q in range(4):
            if 4 * m + q < 5:
                assert (out.dense[4 * m + q] - quads[q]).abs().max().item() <= 1e-5


def test_mosaic_view_key_and_sizes(teachers):
    spec = teachers["sam3"].spec  # 112 px input, 14 px patch
    assert spec.view_key(mosaic=2) == "sam3-mosaic2@56"
    assert spec.view_key() == "sam3@112"
    with pytest.raises(UsageError, match=r"cannot take a 3x3 mosaic.*mosaic sizes that fit: \[2, 4, 8\]"):
        spec.mosaic_tile(3)
    tiles, _ = make_views(_photos(1), spec)  # native size, not tiles
    with pytest.raises(UsageError, match="a 2x2 mosaic takes 56x56 tiles, not 112x112"):
        teachers["sam3"].extract_mosaic(tiles, 2)
