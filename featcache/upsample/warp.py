"""Jittered views for multi-view consistency: random homographies and the warps they induce.

Coordinates are normalized, (-1, -1) the top-left corner and (1, 1) the bottom-right of the base
canvas (``grid_sample`` with ``align_corners=False``). A homography T maps a point of the base to
the same scene point in a view; a view's pixel at v therefore shows the base at T⁻¹v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Jitter:
    """How far a view strays from its base: zoom range, rotation (degrees), shift and perspective
    (in normalized units)."""

    zoom: tuple[float, float] = (0.95, 1.05)
    rotate: float = 5.0
    shift: float = 0.03
    perspective: float = 0.02


def homographies(n: int, jitter: Jitter, generator: torch.Generator) -> torch.Tensor:
    """``n`` random base → view homographies (n, 3, 3), float64."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1]
    lo, hi = jitter.zoom
    s = lo + (hi - lo) * (u[:, 0] + 1) / 2
    theta = u[:, 1] * math.radians(jitter.rotate)
    t = torch.zeros(n, 3, 3, dtype=torch.float64)
    t[:, 0, 0], t[:, 0, 1], t[:, 0, 2] = s * torch.cos(theta), -s * torch.sin(theta), u[:, 2] * jitter.shift
    t[:, 1, 0], t[:, 1, 1], t[:, 1, 2] = s * torch.sin(theta), s * torch.cos(theta), u[:, 3] * jitter.shift
    t[:, 2, 0], t[:, 2, 1], t[:, 2, 2] = u[:, 4] * jitter.perspective, u[:, 5] * jitter.perspective, 1.0
    return t


def grid_of(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ``grid_sample`` grid (n, H, W, 2) of views of ``size`` under homographies ``t``: each
    view pixel's centre mapped back to the base by T⁻¹."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(-1, 3)  # (HW, 3)
    back = points @ torch.linalg.inv(t.cpu()).transpose(1, 2)  # (n, HW, 3)
    return (back[..., :2] / back[..., 2:]).reshape(len(t), h, w, 2)


def warp(x: torch.Tensor, t: torch.Tensor, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (n, C, H, W) of the base seen in each view (bilinear), and where the view sees the
    base at all: (n, 1, H, W) of 1 inside, 0 outside (those cells are zero)."""
    size = size or tuple(x.shape[-2:])
    grid = grid_of(t, size).to(device=x.device, dtype=x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1, keepdim=True).permute(0, 3, 1, 2).to(x.dtype)
    return out, inside


def render(canvas: torch.Tensor, t: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
           antialias: bool = True) -> torch.Tensor:
    """The views (n, 3, size) of canvases (n, 3, H, W) under ``t``: warped at the canvas's own
    resolution, then resized to ``size`` as a teacher's input is. Outside the canvas is 0 (the
    normalized mean colour)."""
    warped, _ = warp(canvas, t)
    return F.interpolate(warped, size=size, mode=mode, align_corners=False, antialias=antialias)


def seam_map(grid: tuple[int, int], factor: int, width: int = 1) -> torch.Tensor:
    """(1, 1, f·h, f·w): 1 on the output cells within ``width`` of a tile seam, else 0."""
    h, w = grid
    rows = torch.zeros(factor * h)
    cols = torch.zeros(factor * w)
    for k in range(1, factor):
        rows[max(0, k * h - width):k * h + width] = 1
        cols[max(0, k * w - width):k * w + width] = 1
    return torch.maximum(rows[:, None], cols[None, :])[None, None]
