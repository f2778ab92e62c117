"""``featsharp eval`` says plainly when the upsampler does worse than bilinear (one warning line, exit 0),
and its picture is readable: a row per image titled by its ``image_id``, the image first, one error scale."""

from __future__ import annotations

import dataclasses
import json

from PIL import Image

from featcache.cli import main
from featcache.upsample.checkpoint import load_upsampler
from featcache.upsample.evaluate import heldout_ids, worse_than_bilinear
from featcache.viz import HEIGHT, LABEL, read_png_text


def test_a_two_step_upsampler_is_worse_than_bilinear_and_eval_says_so_in_one_line(trained_dir, photo_dir, tmp_path,
                                                                                    capsys):
    picture = tmp_path / "fs.png"
    assert main(["featsharp", "eval", str(trained_dir), "--images", str(photo_dir), "--views", "1", "--json",
                 "--picture", str(picture)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout stays one JSON object
    assert report["featsharp_error"] > report["bilinear_error"]  # measured: 2 steps do not beat bilinear here
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("featcache: warning: the upsampler is worse than bilinear")
    assert f"{report['featsharp_error']:.4f}" in warnings[0] and f"{report['bilinear_error']:.4f}" in warnings[0]
    assert f"on the {report['images']} held-out images" in warnings[0]

    ids = heldout_ids(str(photo_dir), load_upsampler(trained_dir)[1].heldout, False)[0][:2]  # the first batch
    title, scale = read_png_text(picture)
    assert title == " | ".join(f"image {i}" for i in ids) and scale > 0
    with Image.open(picture) as im:
        assert im.height == len(ids) * (HEIGHT + 2 * LABEL)  # one titled row per image


def test_the_warning_only_when_featsharp_does_worse():
    from featcache.upsample.evaluate import EvalResult

    worse = EvalResult(images=3, factor=3, views=1, featsharp_error=0.5, bilinear_error=0.4, exact_error=None)
    line = worse_than_bilinear(worse)
    assert line.startswith("featcache: warning:") and "0.5000" in line and "0.4000" in line and "\n" not in line
    assert worse_than_bilinear(dataclasses.replace(worse, featsharp_error=0.3)) is None
    assert worse_than_bilinear(dataclasses.replace(worse, featsharp_error=0.4)) is None  # a tie is no warning
