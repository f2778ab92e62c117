"""Pictures of cached features: PCA to RGB beside the image, and error heatmaps.

``render(cache, image_id, views)``: the source image (as decoded for extraction), then one column
per view: the first three principal components of that image's dense features (fitted per view on
its own tokens), each scaled to its 1st–99th percentile, shown as RGB at the view's grid, enlarged
with nearest-neighbour so cells stay visible. ``render_error``: per-cell relative error
‖a − b‖ / ‖b‖ between two views of one cache (the coarser map resampled bilinearly to the finer
grid) or between one view of two caches, as a black → red → yellow heatmap beside a colour bar that
names the statistic and its scale (0 to the 99th percentile; cells above it show the top colour, marked
``≥``). Panel titles are shortened with ``…`` in the middle to fit their panel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from featcache.decode import decode
from featcache.errors import UsageError

HEIGHT = 256  # pixels of each panel
LABEL = 18
ASCII = {"‖": "|", "−": "-", "≥": ">=", "…": "..."}  # stand-ins where the font lacks the glyph


def _font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (it draws ‖ − ≥ …), else Pillow's bundled font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        return ImageFont.load_default(size=11)


FONT = _font()
_MISSING = bytes(FONT.getmask("\ue000"))  # a private-use code point: drawn as the font's "no glyph" box


def drawable(text: str) -> str:
    """``text`` with each character the font cannot draw replaced by its ASCII stand-in (no tofu boxes)."""
    return "".join(ASCII[c] if c in ASCII and bytes(FONT.getmask(c)) == _MISSING else c for c in text)


BAR = 14  # width of the colour bar's gradient
ERROR_NAME = "relative error ‖a−b‖ / ‖b‖ per cell"


def _row(cache, image_id: str) -> int:
    """The manifest row of ``image_id``, once the manifest is known to be the one the rows were written for."""
    cache.check_manifest()  # rows are positions: a reordered manifest would pair an image with another's features
    ids = cache.manifest.column("image_id").to_pylist()
    try:
        return ids.index(image_id)
    except ValueError:
        raise UsageError(f"no image {image_id!r} in {cache.root.uri} (image ids are the manifest's "
                         f"image_id column, e.g. {ids[0]!r})") from None


def _view(cache, key: str):
    views = cache.views
    if key not in views:
        raise UsageError(f"no view {key!r} in {cache.root.uri}; views: {', '.join(views) or 'none'}")
    return views[key]


def _dense(cache, key: str, row: int) -> np.ndarray:
    view = _view(cache, key)
    if row // view.shard_size not in view.committed_shards():
        raise UsageError(f"{key}: the shard holding image row {row} is not committed yet")
    with view.reader() as reader:
        sample = reader.read(row)
    if not sample.valid:
        raise UsageError(f"{key}: image row {row} failed at extraction (see errors.parquet)")
    return np.asarray(sample.dense, dtype=np.float32)


def pca_rgb(dense: np.ndarray) -> np.ndarray:
    """(h, w, C) features → (h, w, 3) uint8: the first three principal components, each scaled to
    its 1st–99th percentile."""
    h, w, c = dense.shape
    x = dense.reshape(-1, c).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    rgb = np.clip((comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    return (rgb.reshape(h, w, 3) * 255).round().astype(np.uint8)


def heat(values: np.ndarray, vmax: float) -> np.ndarray:
    """(h, w) values in [0, vmax] → black → red → yellow uint8 RGB."""
    t = np.clip(values / vmax if vmax > 0 else values * 0, 0, 1)
    rgb = np.stack([np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1), np.zeros_like(t)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def fit(text: str, width: int) -> str:
    """``text`` shortened with ``…`` in its middle (both ends of a view key or URI stay) to fit ``width`` pixels."""
    text, dots = drawable(text), drawable("…")
    if FONT.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 0 and FONT.getlength(text[:(keep + 1) // 2] + dots + text[len(text) - keep // 2:]) > width:
        keep -= 1
    return text[:(keep + 1) // 2] + dots + text[len(text) - keep // 2:] if keep else ""


def panel(rgb: np.ndarray, label: str, width: int | None = None) -> Image.Image:
    h, w = rgb.shape[:2]
    width = width or max(1, round(HEIGHT * w / h))
    body = Image.fromarray(rgb).resize((width, HEIGHT), Image.NEAREST)
    out = Image.new("RGB", (width, HEIGHT + LABEL), (255, 255, 255))
    out.paste(body, (0, LABEL))
    ImageDraw.Draw(out).text((2, 2), fit(label, width - 4), fill=(0, 0, 0), font=FONT)
    return out


# ---- titled pictures on a fixed error scale (issue 25): shared by train/pictures.py and `featsharp eval` ----

TITLE_KEY, SCALE_KEY = "Title", "featcache:error-scale"  # PNG text chunks: what a reader (or test) can check


def error_scale(err: np.ndarray) -> float:
    """The top of a heatmap's colour scale: the 99th percentile of the finite per-cell errors, their
    maximum when that is 0 (one bad cell in a perfect map still shows)."""
    inside = err[np.isfinite(err)]
    return float(np.percentile(inside, 99)) or float(inside.max())


def titled(picture: Image.Image, title: str) -> Image.Image:
    """``picture`` under a line of text naming it."""
    out = Image.new("RGB", (picture.width, picture.height + LABEL), (255, 255, 255))
    out.paste(picture, (0, LABEL))
    ImageDraw.Draw(out).text((2, 2), fit(title, picture.width - 4), fill=(0, 0, 0), font=FONT)
    return out


def save_png(picture: Image.Image, path, title: str, vmax: float) -> None:
    """Save ``picture`` at ``path`` (folders made) with its title and error scale as PNG text chunks."""
    from pathlib import Path
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TITLE_KEY, title)
    info.add_text(SCALE_KEY, repr(float(vmax)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", pnginfo=info)


def read_png_text(path) -> tuple[str, float]:
    """(title, error scale) a picture of :func:`save_png` records."""
    with Image.open(path) as im:
        return im.text[TITLE_KEY], float(im.text[SCALE_KEY])


def _vertical_text(text: str) -> Image.Image:
    """``text`` on white, rotated to read bottom-up along a colour bar."""
    left, top, right, bottom = FONT.getbbox(text)
    img = Image.new("RGB", (right + 2, bottom + 2), (255, 255, 255))
    ImageDraw.Draw(img).text((1, 1), text, fill=(0, 0, 0), font=FONT)
    return img.rotate(90, expand=True)


def colorbar(vmax: float, name: str, clipped: bool) -> Image.Image:
    """The heatmap's scale, as tall as a panel: the gradient from ``vmax`` (top) to 0 (bottom), three ticks
    with their values (the top one ``≥`` when cells exceed it), and ``name`` along it."""
    ticks = [(0, drawable(f"{'≥' if clipped else ''}{vmax:.3g}")), (HEIGHT // 2, f"{vmax / 2:.3g}"), (HEIGHT - 1, "0")]
    text_w = max(int(FONT.getlength(t)) for _, t in ticks)
    title = _vertical_text(fit(name, HEIGHT))
    out = Image.new("RGB", (4 + BAR + 4 + text_w + 6 + title.width + 2, HEIGHT + LABEL), (255, 255, 255))
    gradient = heat(np.linspace(vmax, 0, HEIGHT)[:, None].repeat(BAR, axis=1), vmax)
    out.paste(Image.fromarray(gradient), (4, LABEL))
    draw = ImageDraw.Draw(out)
    for y, text in ticks:
        draw.line([(4 + BAR, LABEL + y), (4 + BAR + 3, LABEL + y)], fill=(0, 0, 0))
        draw.text((4 + BAR + 5, LABEL + min(max(y - 6, 0), HEIGHT - 12)), text, fill=(0, 0, 0), font=FONT)
    out.paste(title, (out.width - title.width - 2, LABEL + (HEIGHT - title.height) // 2))
    return out


def _image_panel(cache, row: int) -> Image.Image:
    from featcache.sources.read import ImageReader

    uri = cache.manifest.column("uri")[row].as_py()
    pixels = decode(ImageReader(cache.manifest).read(row), uri).permute(1, 2, 0).numpy()  # files, tar members, rows
    h, w = pixels.shape[:2]
    width = max(1, round(HEIGHT * w / h))
    return panel(np.asarray(Image.fromarray(pixels).resize((width, HEIGHT), Image.BILINEAR)), "image", width)


def strip(panels: list[Image.Image]) -> Image.Image:
    gap = 4
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), HEIGHT + LABEL),
                    (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def render(cache, image_id: str, views: list[str] | None = None) -> Image.Image:
    """The image, then the PCA-as-RGB picture of each view (all views when ``views`` is None)."""
    row = _row(cache, image_id)
    keys = views or list(cache.views)
    panels = [_image_panel(cache, row)]
    for key in keys:
        panels.append(panel(pca_rgb(_dense(cache, key, row)), key))
    return strip(panels)


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-cell ‖a − b‖ / ‖b‖ after resampling both to the finer of the two grids."""
    if a.shape[-1] != b.shape[-1]:
        raise UsageError(f"cannot compare {a.shape[-1]} channels with {b.shape[-1]}")
    size = max(a.shape[:2], b.shape[:2])

    def resample(x):
        t = torch.from_numpy(np.array(x, dtype=np.float32)).permute(2, 0, 1)[None]
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()

    a, b = resample(a), resample(b)
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)


@dataclass(frozen=True)
class ErrorMap:
    """The per-cell error of one view against another (same cache) or against itself in another cache."""

    row: int
    err: np.ndarray  # (h, w) relative error per cell, on the finer grid
    label: str  # "a = <view>, b = <view or cache view>"

    def summary(self) -> str:
        """One line: the statistic, its mean, 99th percentile and maximum over the cells."""
        e = self.err
        return (f"{ERROR_NAME}: mean {e.mean():.3g}, 99th percentile {np.percentile(e, 99):.3g}, "
                f"max {e.max():.3g} over {e.size} cells")


def error_map(cache, image_id: str, view_a: str, view_b: str | None = None, other=None) -> ErrorMap:
    """The error of ``view_a`` against ``view_b`` (same cache) or against the same view of the cache
    ``other``; refused when the two come from different teachers (unrelated feature spaces)."""
    row = _row(cache, image_id)
    if other is not None:
        b_cache, b_key, b_row, label = other, view_b or view_a, _row(other, image_id), f"{other.root.uri} {view_b or view_a}"
    elif view_b:
        b_cache, b_key, b_row, label = cache, view_b, row, view_b
    else:
        raise UsageError("an error map needs a second view or a second cache")
    _same_teacher(cache, view_a, b_cache, b_key)
    err = relative_error(_dense(cache, view_a, row), _dense(b_cache, b_key, b_row))
    return ErrorMap(row, err, f"a = {view_a}, b = {label}")


def _same_teacher(cache_a, key_a: str, cache_b, key_b: str) -> None:
    """Refuse two views whose features come from different teachers: an error between them means nothing."""
    a, b = (_view(c, k).spec.teacher for c, k in ((cache_a, key_a), (cache_b, key_b)))
    if _teacher_identity(a) != _teacher_identity(b):
        raise UsageError(f"{key_a} and {key_b} come from different teachers ({_teacher_name(a)}, {_teacher_name(b)}): "
                         "their features live in unrelated spaces, so an error between them means nothing; "
                         "compare two views of one teacher, or one view of two caches written by the same teacher")


def _teacher_identity(teacher: dict) -> tuple:
    """What makes two views' features comparable: the family and its weights (by hash when recorded)."""
    weights = teacher.get("weights_hash") or (teacher.get("source"), teacher.get("name"))
    return teacher.get("family"), weights


def _teacher_name(teacher: dict) -> str:
    digest = teacher.get("weights_hash")
    return f"{teacher.get('family')} weights {digest[:19]}" if digest else f"{teacher.get('family')} from {teacher.get('source')}"


def draw_error(cache, m: ErrorMap) -> Image.Image:
    """The image, the error heatmap and its colour bar (0 to the 99th percentile; a map of zeros, two
    identical caches, keeps a 0-to-1 scale and says so in the bar's name)."""
    vmax = error_scale(m.err)
    name = ERROR_NAME if vmax > 0 else f"{ERROR_NAME}: all 0 (identical)"
    scale = vmax if vmax > 0 else 1.0
    return strip([_image_panel(cache, m.row), panel(heat(m.err, scale), m.label),
                  colorbar(scale, name, clipped=bool(m.err.max() > scale))])


def render_error(cache, image_id: str, view_a: str, view_b: str | None = None, other=None) -> Image.Image:
    """Heatmap of the error of ``view_a`` against ``view_b`` (same cache) or against the same view
    of the cache ``other`` (see :func:`error_map`)."""
    return draw_error(cache, error_map(cache, image_id, view_a, view_b, other))
