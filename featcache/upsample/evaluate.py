"""Held-out reconstruction error of an upsampler against plain bilinear upsampling of the global view.

    featcache featsharp eval CKPT --images SRC [--views 4] [--picture out.png] [--json]

Ground truth comes from the teacher itself: jittered views (homographies as in training, seeded)
of each held-out canvas, at the teacher's native size. A map of the canvas (FeatSharp's, or the
bilinear upsampling of the de-biased global map) is warped into each view and area-averaged to the
teacher's grid; its error is the mean squared difference per channel, in PHI-S space, over the cells
the view sees inside the canvas. When the teacher is patch-local (its tiled map of a canvas equals
its map of the whole canvas, which it can take), the exact high-resolution map is known too, and
both maps are also compared with it.

The picture (``--picture``) has one row per image of the first batch, titled by its ``image_id``: the image,
PCA of the global map, bilinear, FeatSharp and the tiles, then the per-cell error of bilinear and of
FeatSharp against the exact map (patch-local teachers) or else the assembled tiles, both on one colour scale
for the whole picture — the 99th percentile of bilinear's errors (the baseline), so FeatSharp reads darker
where it does better. :func:`worse_than_bilinear` is the one warning line ``eval`` prints when it does worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from featcache.decode import decode
from featcache.errors import UsageError
from featcache.store.location import locate
from featcache.manifest import list_source
from featcache.teachers import create_teacher
from featcache.upsample import run
from featcache.upsample.checkpoint import load_upsampler
from featcache.upsample.featsharp import assemble
from featcache.upsample.settings import torch_device
from featcache.upsample.training import is_heldout
from featcache.upsample.warp import Jitter, homographies, render, warp


@dataclass
class Errors:
    """Running sums of squared error and cell counts, per method."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, squared: torch.Tensor, cells: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float((squared * cells).sum())
        self.counts[name] = self.counts.get(name, 0.0) + float(cells.sum())

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.counts[name], 1.0)


@dataclass(frozen=True)
class EvalResult:
    images: int
    factor: int
    views: int
    featsharp_error: float
    bilinear_error: float
    exact_error: dict | None  # {"featsharp", "bilinear"} for a patch-local teacher, else None

    def to_dict(self) -> dict:
        return {"images": self.images, "factor": self.factor, "views": self.views,
                "featsharp_error": self.featsharp_error, "bilinear_error": self.bilinear_error,
                "exact_error": self.exact_error}


def heldout_ids(src: str, heldout: dict, every: bool) -> tuple[list[str], dict[str, str]]:
    """The image ids of ``src`` that the checkpoint's training left out (all with ``every``), and their URIs."""
    entries, _ = list_source(src)
    uris = {e.image_id: e.loc.uri for e in entries}
    ids = sorted(i for i in uris if every or is_heldout(i, heldout["fraction"], heldout["seed"]))
    if not ids:
        raise UsageError(f"none of the {len(uris)} images of {src} was held out of training (heldout "
                         f"{heldout['fraction']}): give images it never saw, with --all")
    return ids, uris


def evaluate(ckpt: str, images: str, views: int = 4, every: bool = False, batch_size: int = 2, seed: int = 1234,
             device: str = "cpu", picture: str | None = None) -> EvalResult:
    """Errors of the upsampler in ``ckpt`` and of bilinear upsampling on the held-out images of ``images``."""
    device = torch_device(device)  # refused before anything loads, as a training run's
    model, description = load_upsampler(ckpt, device)
    t = description.teacher
    teacher = create_teacher(t.family, t.source, t.revision, device=str(device), name=t.name)
    if t.weights_hash and teacher.spec.weights_hash != t.weights_hash:
        raise UsageError(f"{t.source} holds other weights than the teacher {ckpt} was trained for")
    ids, uris = heldout_ids(images, description.heldout, every)
    errors, generator, f = Errors(), torch.Generator().manual_seed(seed), model.config.factor
    exact = None
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            batch = [decode(locate(uris[i]).read_bytes(), uris[i]) for i in ids[start:start + batch_size]]
            canvas = run.canvases(batch, teacher.spec, f, device=device)[0]
            out = run.upsample(model, teacher, canvas)
            maps = {"featsharp": out.dense, "bilinear": model.bilinear(out.global_raw)}
            _view_errors(errors, model, teacher, canvas, maps, views, generator)
            exact = _exact_errors(errors, model, teacher, canvas, out.tiles_raw, maps, exact)
            if picture and start == 0:
                reference = _exact_target(model, teacher, canvas) if exact else None
                _picture(picture, model, batch, ids[:len(batch)], out, maps, reference)
    return EvalResult(len(ids), f, views, errors.mean("featsharp"), errors.mean("bilinear"),
                      {k: errors.mean(f"exact_{k}") for k in maps} if exact else None)


def _view_errors(errors: Errors, model, teacher, canvas, maps: dict, views: int, generator) -> None:
    spec, f = teacher.spec, model.config.factor
    t = homographies(len(canvas) * views, Jitter(), generator)
    target = model.normalize(teacher.extract(render(canvas.repeat_interleave(views, 0), t, spec.input_size,
                                                    spec.resize, spec.antialias), dtype=torch.float32).dense)
    for name, m in maps.items():
        warped, inside = warp(m.repeat_interleave(views, 0), t)
        cells = (F.avg_pool2d(inside, f) > 0.999).float()
        errors.add(name, ((F.avg_pool2d(warped, f) - target) ** 2).mean(dim=1, keepdim=True), cells)


def _exact_errors(errors: Errors, model, teacher, canvas, tiles: torch.Tensor, maps: dict, known: bool | None) -> bool:
    """Compare with the exact map when the teacher is patch-local (decided on the first batch)."""
    if known is False or teacher.spec.size_rule != "multiple":
        return False
    whole = teacher.extract(canvas, dtype=torch.float32).dense
    if known is None:
        tiled = assemble(tiles.permute(0, 3, 1, 2), model.config.factor).permute(0, 2, 3, 1)
        if (tiled - whole).abs().max() > 1e-4 * whole.abs().max():
            return False
    target = _exact_target(model, teacher, canvas, whole)
    cells = torch.ones_like(target[:, :1])
    for name, m in maps.items():
        errors.add(f"exact_{name}", ((m - target) ** 2).mean(dim=1, keepdim=True), cells)
    return True


def _exact_target(model, teacher, canvas, whole: torch.Tensor | None = None) -> torch.Tensor:
    """The exact map of a patch-local teacher, (B, C, H, W) in the upsampler's space (PHI-S, de-biased)."""
    whole = teacher.extract(canvas, dtype=torch.float32).dense if whole is None else whole
    debias = F.interpolate(model.debias[None], size=model.config.out_grid, mode="bilinear", align_corners=False)
    return model.phis(whole) + debias


def _picture(path: str, model, images: list, ids: list[str], out, maps: dict, exact: torch.Tensor | None) -> None:
    """One row per image (see the module docstring), every error map on bilinear's scale."""
    from featcache.viz import error_scale, save_png, titled

    f = model.config.factor
    tiles = assemble(model.normalize(out.tiles_raw), f)
    reference, against = (exact, "the exact map") if exact is not None else (tiles, f"the {f}x{f} tiles")
    errors = {k: ((maps[k] - reference) ** 2).mean(dim=1).float().cpu().numpy() for k in ("bilinear", "featsharp")}
    vmax = error_scale(errors["bilinear"])
    rows = [titled(_row(model, i, images[i], ids[i], out, maps, tiles, errors, vmax), f"image {ids[i]}: "
                   f"error per cell against {against}") for i in range(len(ids))]
    save_png(_stack(rows), path, " | ".join(f"image {i}" for i in ids), vmax)


def _row(model, i: int, image: torch.Tensor, image_id: str, out, maps: dict, tiles, errors: dict, vmax: float):
    """Image ``i``'s strip: the image, four PCA panels, bilinear's and FeatSharp's errors and the colour bar."""
    from featcache.viz import HEIGHT, colorbar, heat, panel, pca_rgb, strip

    f = model.config.factor
    pixels = image.permute(1, 2, 0).cpu().numpy()
    width = max(1, round(HEIGHT * pixels.shape[1] / pixels.shape[0]))
    pcas = {"global view": model.normalize(out.global_raw)[i], f"bilinear {f}x": maps["bilinear"][i],
            f"FeatSharp {f}x": maps["featsharp"][i], f"{f}x{f} tiles": tiles[i]}
    panels = [panel(pixels, image_id, width)]
    panels += [panel(pca_rgb(m.permute(1, 2, 0).float().cpu().numpy()), label) for label, m in pcas.items()]
    err = {k: e[i] for k, e in errors.items()}
    panels += [panel(heat(e, vmax), f"{k} error") for k, e in err.items()]
    clipped = bool(max(e.max() for e in err.values()) > vmax)
    return strip(panels + [colorbar(vmax, "MSE per cell, mean over channels", clipped)])


def _stack(rows: list[Image.Image]) -> Image.Image:
    """The rows one under the other, on white."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def worse_than_bilinear(result: EvalResult) -> str | None:
    """The one warning line when the upsampler's held-out error exceeds bilinear's (None otherwise)."""
    if result.featsharp_error <= result.bilinear_error:
        return None
    return (f"featcache: warning: the upsampler is worse than bilinear upsampling on the {result.images} held-out "
            f"images: error {result.featsharp_error:.4f} against bilinear's {result.bilinear_error:.4f} "
            "(MSE per channel, PHI-S space); train it longer or on more images before extracting with it")


def table(result: EvalResult) -> str:
    """The human-readable report."""
    lines = [f"{result.images} held-out images, {result.views} jittered views each, factor {result.factor}x",
             "error (MSE per channel, PHI-S space)   FeatSharp   bilinear",
             f"  against the teacher's views          {result.featsharp_error:9.4f}  {result.bilinear_error:9.4f}"]
    if result.exact_error:
        lines.append(f"  against the exact map (patch-local)  {result.exact_error['featsharp']:9.4f}  "
                     f"{result.exact_error['bilinear']:9.4f}")
    return "\n".join(lines)


