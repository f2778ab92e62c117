"""Running an upsampler with its teacher: canvases, the one teacher batch of global views and
tiles, and the upsampled maps (ALGORITHMS.md §7, steps 1-2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featcache.teachers.views import crop_resize, normalize, view_box
from featcache.upsample.featsharp import FeatSharp, split


@dataclass(frozen=True)
class Upsampled:
    """What canvases give: the upsampled maps (B, C, H, W) in PHI-S space, the global views' raw maps
    (B, h, w, C) and summaries (B, Cs), the tiles' raw maps (B·f², h, w, C)."""

    dense: torch.Tensor
    global_raw: torch.Tensor
    summary: torch.Tensor
    tiles_raw: torch.Tensor


def canvases(images: list[torch.Tensor], spec, factor: int, policy: str = "squash",
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized canvases (B, 3, f·S, f·S) of uint8 images (S: the teacher's native size), and the
    boxes of the source images they show, as ``make_views`` makes a teacher's views."""
    size = (spec.input_size[0] * factor, spec.input_size[1] * factor)
    boxes = [view_box(im.shape[-1], im.shape[-2], policy) for im in images]
    pixels = torch.stack([crop_resize(im.to(device), b, size, spec.resize, spec.antialias)
                          for im, b in zip(images, boxes)])
    return normalize(pixels, spec.mean, spec.std), torch.tensor(boxes, dtype=torch.float32)


def global_view(canvas: torch.Tensor, spec) -> torch.Tensor:
    """The canvases resized to the teacher's native size, as its own preprocessing resizes."""
    return F.interpolate(canvas, size=tuple(spec.input_size), mode=spec.resize, align_corners=False,
                         antialias=spec.antialias)


def teacher_batch(canvas: torch.Tensor, spec, factor: int) -> torch.Tensor:
    """The teacher inputs of each canvas, together: its global view (the canvas resized to the
    teacher's size) then its f² tiles row-major, (B·(1 + f²), 3, S, S)."""
    b = len(canvas)
    whole = global_view(canvas, spec)
    tiles = split(canvas, factor).reshape(b, factor * factor, *whole.shape[1:])
    return torch.cat([whole[:, None], tiles], dim=1).flatten(0, 1)


def guide(canvas: torch.Tensor, out_grid: tuple[int, int]) -> torch.Tensor:
    """The JBU's guide: the canvas resized to the output grid."""
    return F.interpolate(canvas, size=out_grid, mode="bilinear", align_corners=False, antialias=True)


def teacher_maps(teacher, canvas: torch.Tensor, factor: int, batch_size: int | None = None):
    """(global raw maps (B, h, w, C), tile raw maps (B·f², h, w, C), global summaries (B, Cs))."""
    per = 1 + factor * factor
    out = teacher.extract(teacher_batch(canvas, teacher.spec, factor), batch_size, dtype=torch.float32)
    dense = out.dense.reshape(len(canvas), per, *out.dense.shape[1:])
    return dense[:, 0], dense[:, 1:].flatten(0, 1), out.summary.reshape(len(canvas), per, -1)[:, 0]


def upsample(model: FeatSharp, teacher, canvas: torch.Tensor, batch_size: int | None = None) -> Upsampled:
    """The upsampled maps of normalized canvases (on the model's device)."""
    global_raw, tiles_raw, summary = teacher_maps(teacher, canvas, model.config.factor, batch_size)
    dense = model(global_raw, tiles_raw, guide(canvas, model.config.out_grid))
    return Upsampled(dense, global_raw, summary, tiles_raw)
