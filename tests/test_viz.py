"""featcache.viz on store-level caches (no teachers): the error heatmap's colour bar and panel titles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from featcache import viz
from featcache.store.location import locate
from featcache.store import Cache, tables
from tests.support.caches import spec, write_all
from tests.test_s3_preflight import closed_endpoint  # noqa: F401 (fixture)


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


# ---- issue 23: a reordered manifest, two teachers, identical caches, S3 preflight, non-view folders -----


def _viz(root, *args: str, out) -> list[str]:
    from featcache.cli import main

    return [str(main(["viz", str(root), "--image", "img1", "--out", str(out), *args]))]


def test_viz_refuses_a_reordered_manifest(cache, tmp_path, capsys):
    """Rows are positions: after the manifest's rows were reversed (index column kept with its rows), viz
    drew img1 beside img2's features; it refuses in one line, as extract, stats, train and verify do."""
    manifest = cache.manifest
    tables.write_table(cache.root.join(tables.MANIFEST), manifest.take(list(reversed(range(manifest.num_rows)))))
    for args in ([], ["--error", list(cache.views)[0], "--error", list(cache.views)[1]]):
        assert _viz(cache.root.uri, *args, out=tmp_path / "v.png") == ["2"]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "manifest.parquet no longer matches the cache: row 0" in err[0], err
        assert not (tmp_path / "v.png").exists()


def test_an_error_map_between_two_teachers_is_refused(cache, tmp_path, capsys):
    other = spec("other-teacher@224", grid=(4, 6))
    other = other.__class__(**{**other.__dict__, "teacher": {"family": "siglip2", "source": "elsewhere",
                                                               "weights_hash": "sha256:abc"}})
    write_all(cache.create_view(other), seed=3)
    assert _viz(cache.root.uri, "--error", list(cache.views)[0], "--error", other.key, out=tmp_path / "e.png") == ["2"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different teachers" in err[0] and other.key in err[0], err


def test_identical_caches_give_a_number_and_a_sane_colour_bar(cache, tmp_path, capsys):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(cache.root.path, twin)
    key = list(cache.views)[0]
    png = tmp_path / "same.png"
    assert _viz(cache.root.uri, "--error", key, "--against", str(twin), out=png) == ["0"]
    out = capsys.readouterr().out
    assert "relative error ‖a−b‖ / ‖b‖ per cell: mean 0, 99th percentile 0, max 0 over 24 cells" in out, out
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert len(_bar_columns(picture)) == viz.BAR  # the whole gradient, not a black bar labelled 0/0/0
    keys = list(cache.views)
    assert _viz(cache.root.uri, "--error", keys[0], "--error", keys[1], out=png) == ["0"]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("relative error ‖a−b‖ / ‖b‖ per cell: mean ") and "over 96 cells" in line, line


def test_viz_skips_a_folder_that_is_not_a_view(cache, tmp_path, capsys):
    import os

    os.mkdir(os.path.join(cache.root.path, "features.zarr", "junk"))
    assert _viz(cache.root.uri, out=tmp_path / "v.png") == ["0"]
    assert "features.zarr/junk: a folder that is not a view (left alone)" in capsys.readouterr().err


@pytest.mark.s3
def test_viz_on_an_unreachable_endpoint_is_one_line(closed_endpoint, tmp_path, capsys):
    from tests.test_s3_preflight import assert_one_line, run_cli

    result = run_cli(["viz", "s3://b/cache", "--image", "x", "--out", str(tmp_path / "v.png")], capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for s3://b/cache")
    result = run_cli(["viz", str(tmp_path), "--image", "x", "--error", "v", "--against", "s3://b/other",
                      "--out", str(tmp_path / "v.png")], capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for s3://b/other")


@pytest.mark.s3
@pytest.mark.parametrize("variable, value", [("AWS_SECRET_ACCESS_KEY", "wrong-secret"), ("AWS_ACCESS_KEY_ID", None)])
def test_viz_with_refused_or_missing_credentials_is_one_line(s3_root, monkeypatch, tmp_path, variable, value, capsys):
    from tests.test_s3_preflight import assert_one_line, run_cli

    if value is None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    else:
        monkeypatch.setenv(variable, value)
    result = run_cli(["viz", s3_root, "--image", "x", "--out", str(tmp_path / "v.png")], capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {s3_root}")
