"""featcache.viz on store-level caches (no teachers): the error heatmap's colour bar and panel titles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from featcache import viz
from featcache.fsio import locate
from featcache.store import Cache, tables
from tests.support.caches import spec, write_all


@pytest.fixture
def cache(tmp_path) -> Cache:
    """Four real (random-pixel) PNGs and two views of one teacher at two grids, every shard written."""
    rng = np.random.default_rng(0)
    uris = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    table = pa.table({"index": pa.array(range(4), pa.int64()), "image_id": [f"img{i}" for i in range(4)],
                      "uri": uris, "width": pa.array([72] * 4, pa.int32()), "height": pa.array([48] * 4, pa.int32())})
    root = str(tmp_path / "cache")
    tables.write_table(locate(root).join(tables.MANIFEST), table)
    cache = Cache.open(root)
    write_all(cache.create_view(spec("a-rather-long-teacher-name@224", grid=(4, 6)), shard_size=2), seed=1)
    write_all(cache.create_view(spec("a-rather-long-teacher-name@448", grid=(8, 12)), shard_size=2), seed=2)
    return cache


def _bar_columns(picture: np.ndarray) -> list[int]:
    """Columns whose body runs through the heat colormap top (yellow) to bottom (black), monotonically."""
    body = picture[viz.LABEL:].astype(int)
    found = []
    for x in range(picture.shape[1]):
        r, g, b = body[:, x, 0], body[:, x, 1], body[:, x, 2]
        ends = tuple(body[0, x]) == (255, 255, 0) and tuple(body[-1, x]) == (0, 0, 0)
        if ends and (b == 0).all() and (np.diff(r) <= 0).all() and (np.diff(g) <= 0).all():
            found.append(x)
    return found


def test_error_heatmap_has_a_colour_bar_and_is_wider_for_it(cache, tmp_path):
    keys = list(cache.views)
    picture = viz.render_error(cache, "img1", keys[0], keys[1])
    picture.save(tmp_path / "error.png")
    without = viz.render(cache, "img1", [keys[1]])  # the same image and grid panels, no colour bar
    assert picture.height == without.height == viz.HEIGHT + viz.LABEL
    assert picture.width > without.width + viz.BAR
    bar = _bar_columns(np.asarray(picture.convert("RGB")))
    assert len(bar) == viz.BAR and min(bar) > without.width  # the whole gradient, right of the heatmap
    assert _bar_columns(np.asarray(without.convert("RGB"))) == []


def test_colour_bar_shows_its_scale_and_the_statistic():
    assert viz.ERROR_NAME == "relative error ‖a−b‖ / ‖b‖ per cell"  # what relative_error computes
    plain, clipped = viz.colorbar(0.5, viz.ERROR_NAME, False), viz.colorbar(0.5, viz.ERROR_NAME, True)
    text = np.asarray(plain.convert("L"))[viz.LABEL:, viz.BAR + 8:]  # right of the gradient: ticks and name
    assert (text < 128).sum() > 200  # tick values and the rotated name are drawn
    assert not np.array_equal(np.asarray(plain), np.asarray(clipped))  # "≥0.5" when cells exceed the scale


def test_relative_error_is_the_named_statistic():
    a, b = np.zeros((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32)
    b[0, 0] = [3, 4, 0]
    a[0, 0] = [3, 4, 5]
    expected = np.ones((2, 2))
    expected[0, 0] = 1.0  # ‖(0, 0, 5)‖ / ‖(3, 4, 0)‖ = 5 / 5
    np.testing.assert_allclose(viz.relative_error(a, b), expected, rtol=1e-6)


@pytest.mark.parametrize("width", [40, 120, 300])
def test_titles_fit_their_panel(width):
    title = "a = dinov3-7b@512, b = s3://a-long-bucket-name/some/deep/cache/root sam3-mosaic3@336"
    short = viz.fit(title, width)
    assert viz.FONT.getlength(short) <= width
    assert short.startswith("a") and short.endswith("6") and viz.drawable("…") in short
    assert viz.fit("a = x", width) == "a = x"


def test_error_panel_title_is_drawn_inside_its_panel(cache):
    keys = list(cache.views)
    picture = np.asarray(viz.render_error(cache, "img1", keys[0], keys[1]).convert("L"))
    image_w = round(viz.HEIGHT * 72 / 48)
    panel_w = round(viz.HEIGHT * 12 / 8)
    gap = picture[: viz.LABEL, image_w + 4 + panel_w - 2: image_w + 4 + panel_w + 4]
    assert (gap > 250).all()  # no title glyph runs past its panel's right edge into the gap


def test_labels_use_only_glyphs_the_font_draws():
    for text in (viz.ERROR_NAME, "≥0.5", "a…b"):
        drawn = viz.drawable(text)
        assert all(bytes(viz.FONT.getmask(c)) != bytes(viz.FONT.getmask("\ue000")) for c in drawn if c != " ")
