"""The Sparsity Roofline picture: predicted speedup (x) against a quality figure (y), one curve per
sparsity pattern, one point per degree (after Shinn et al., "The Sparsity Roofline", 2023).

Input: a CSV with columns ``pattern``, ``degree``, ``speedup`` and one quality column (its header is the
y axis's name), and optionally ``steps`` (the training each point had; not drawn); a ``dense`` row
(speedup 1) is drawn as the reference point. Drawn with Pillow.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

from featcache.errors import UsageError
from featcache.viz import FONT

COLOURS = {"dense": (0, 0, 0), "unstructured": (31, 119, 180), "block": (255, 127, 14), "2:4": (44, 160, 44)}
#: for a second pattern of a family (another block size) and any other pattern
MORE_COLOURS = [(214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 440, 70, 150, 30, 50


def read(path: str) -> tuple[str, list[dict]]:
    """(the quality column's name, rows with pattern, degree, speedup, quality); one line on a bad file."""
    if not Path(path).is_file():
        raise UsageError(f"no such results file: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [c for c in (rows[0].keys() if rows else []) if c not in ("pattern", "degree", "speedup", "steps")]
    if not rows or len(names) != 1 or not {"pattern", "degree", "speedup"} <= set(rows[0]):
        raise UsageError(f"{path}: need columns pattern, degree, speedup and one quality column")
    try:
        return names[0], [{"pattern": r["pattern"], "degree": float(r["degree"]), "speedup": float(r["speedup"]),
                           "quality": float(r[names[0]])} for r in rows]
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None


def draw(path: str, out: str) -> Image.Image:
    """Write the picture of the results in ``path`` to ``out`` (PNG) and return it."""
    name, rows = read(path)
    xs, ys = [r["speedup"] for r in rows], [r["quality"] for r in rows]
    (x0, x1), (y0, y1) = _span(min(xs + [1.0]), max(xs + [1.0])), _span(min(ys), max(ys))
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)  # noqa: E731
    py = lambda y: H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)  # noqa: E731
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    for k in range(5):
        x, y = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        d.text((px(x) - 12, H - BOTTOM + 4), f"{x:.2f}", fill=(0, 0, 0), font=FONT)
        d.text((4, py(y) - 6), f"{y:.3g}", fill=(0, 0, 0), font=FONT)
    d.line([px(1.0), TOP, px(1.0), H - BOTTOM], fill=(200, 200, 200))
    d.text((LEFT + 120, H - 20), "predicted speedup over dense (roofline)", fill=(0, 0, 0), font=FONT)
    d.text((LEFT, 8), f"Sparsity Roofline: {name} against predicted speedup", fill=(0, 0, 0), font=FONT)
    for k, (pattern, colour) in enumerate(colours({r["pattern"] for r in rows}).items()):
        pts = sorted((r for r in rows if r["pattern"] == pattern), key=lambda r: r["degree"])
        if len(pts) > 1:
            d.line([(px(r["speedup"]), py(r["quality"])) for r in pts], fill=colour, width=2)
        for r in pts:
            x, y = px(r["speedup"]), py(r["quality"])
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            d.text((x + 5, y - 12), f"{r['degree']:g}", fill=colour, font=FONT)
        d.text((W - RIGHT + 10, TOP + 16 * k), f"— {pattern}", fill=colour, font=FONT)
    img.save(out, format="PNG")
    return img


def colours(patterns: set[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per pattern, in legend order: a family's own (``block4x4`` and ``block`` are of the
    block family) for its first pattern, the next of :data:`MORE_COLOURS` for any other."""
    family = lambda p: "block" if p.startswith("block") else p  # noqa: E731
    order = sorted(patterns, key=lambda p: (list(COLOURS).index(family(p)) if family(p) in COLOURS else len(COLOURS), p))
    out, spare = {}, iter(MORE_COLOURS * (1 + len(order) // len(MORE_COLOURS)))
    for p in order:
        taken = family(p) in COLOURS and COLOURS[family(p)] in out.values()
        out[p] = next(spare) if taken or family(p) not in COLOURS else COLOURS[family(p)]
    return out


def _span(lo: float, hi: float) -> tuple[float, float]:
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad
