"""Neighbourhood operations as shifted multiply-adds: a k x k window around every output cell.

Both the joint bilateral upsampler and the fuser's local attention weigh, for each cell p, the
cells q of a ``window`` x ``window`` neighbourhood. An ``unfold`` would materialize window² copies
of the feature map (49 x 72² x 1536 float32 = 1.5 GB); here each offset is a view of the padded
map, multiplied in and added to one accumulator, so the memory is the map, its padding and the
per-cell weights (window² x H x W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def offsets(window: int) -> list[tuple[int, int]]:
    """The (dy, dx) of a ``window`` x ``window`` neighbourhood, row-major (its centre in the middle)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"a neighbourhood window must be odd and positive, not {window}")
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def shifted(padded: torch.Tensor, dy: int, dx: int, r: int, size: tuple[int, int]) -> torch.Tensor:
    """The view of a map padded by ``r`` on each side whose cell p holds the map's cell p + (dy, dx)."""
    h, w = size
    return padded[..., r + dy:r + dy + h, r + dx:r + dx + w]


def inside(window: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """(window², H, W) booleans: whether p + offset lies on the map (neighbours past an edge do not count)."""
    r = window // 2
    ones = F.pad(torch.ones(1, *size, device=device), (r, r, r, r))
    return torch.stack([shifted(ones, dy, dx, r, size)[0] for dy, dx in offsets(window)]) > 0


def pairwise(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """⟨a_p, b_{p+d}⟩ over the channel axis (dim -3) for every offset d: ``(..., window², H, W)``.

    ``a`` and ``b``: (..., K, H, W)."""
    r, size = window // 2, tuple(a.shape[-2:])
    padded = F.pad(b, (r, r, r, r))
    return torch.stack([(a * shifted(padded, dy, dx, r, size)).sum(-3) for dy, dx in offsets(window)], dim=-3)


def gather(weights: torch.Tensor, x: torch.Tensor, window: int) -> torch.Tensor:
    """Σ_d weights[..., d, p] · x[..., :, p + d]: ``(..., C, H, W)`` from weights ``(..., window², H, W)``.

    One accumulator; in inference (no autograd) the adds are in place, so the only map-sized
    tensors are ``x`` padded and the result."""
    r, size = window // 2, tuple(x.shape[-2:])
    padded = F.pad(x, (r, r, r, r))
    out = torch.zeros_like(x)
    grad = torch.is_grad_enabled() and (weights.requires_grad or x.requires_grad)
    for q, (dy, dx) in enumerate(offsets(window)):
        w = weights[..., q:q + 1, :, :]
        out = torch.addcmul(out, w, shifted(padded, dy, dx, r, size)) if grad else \
            out.addcmul_(w, shifted(padded, dy, dx, r, size))
    return out
