"""Magnitude pruning of the student's block linear layers, for the Sparsity Roofline (issue 15).

``prune = "unstructured:0.9"`` removes, in each block linear layer (qkv, proj, the MLP's two), the
fraction of weights with the smallest magnitudes; ``block:0.75`` the 4 x 4 tiles of the weight with the
smallest norms (``block8x8:0.75``: 8 x 8 tiles; rows x columns of the (out, in) weight); ``2:4`` the two smaller of every four consecutive input weights of each output. The
masks are taken once, when training starts (from the ``--init`` weights), and re-applied after every
optimizer step, so the distillation that follows trains only the weights kept. A resumed run takes
them again from its checkpoint's weights: the pruned ones are exact zeros, so they are the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

from featcache.errors import UsageError
from featcache.roofline import BLOCK, Sparsity, parse_sparsity


def parse(spec: str) -> Sparsity:
    """``unstructured:D``, ``block:D``, ``blockRxC:D`` or ``2:4`` (the roofline's specs), refused in one line."""
    try:
        return parse_sparsity(spec)
    except ValueError as e:
        raise UsageError(f"prune {spec!r}: give unstructured:D or block:D (blockRxC:D for R x C blocks) "
                         f"with 0 < D < 1, or 2:4 ({e})") from None


def block_linears(student: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of the transformer blocks (what a sparse pattern acts on)."""
    return {name: m for name, m in student.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}


@torch.no_grad()
def mask_of(weight: torch.Tensor, pattern: str, degree: float, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The keep-mask (bool, the weight's shape (out, in)) of one weight (``block``: rows x columns)."""
    w = weight.abs().float()
    if pattern == "2:4":
        groups = w.reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(2, dim=2).indices, True)
        return keep.reshape(w.shape)
    if pattern == "block":
        r, c = block
        tiles = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).pow(2).sum(dim=(1, 3))
        return _top(tiles, degree).repeat_interleave(r, 0).repeat_interleave(c, 1)
    return _top(w, degree)


def _top(score: torch.Tensor, degree: float) -> torch.Tensor:
    """True for the (1 − degree) largest scores (ties broken by position)."""
    keep = max(1, round(score.numel() * (1 - degree)))
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[score.flatten().topk(keep).indices] = True
    return flat.reshape(score.shape)


def masks(student: nn.Module, spec: str) -> dict[str, torch.Tensor]:
    """Per block linear layer, its keep-mask under ``spec``."""
    s = parse(spec)
    layers = block_linears(student)
    for name, m in layers.items():
        r, c = s.block if s.pattern == "block" else (1, 4 if s.pattern == "2:4" else 1)
        if m.weight.shape[0] % r or m.weight.shape[1] % c:
            raise UsageError(f"prune {spec!r}: {name} is {tuple(m.weight.shape)}, not a multiple of {r}x{c}")
    return {name: mask_of(m.weight, s.pattern, s.degree, s.block) for name, m in layers.items()}


@torch.no_grad()
def apply(student: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight."""
    layers = block_linears(student)
    for name, mask in keep.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def density(student: nn.Module) -> float:
    """The fraction of the block linear layers' weights that are not zero."""
    layers = block_linears(student).values()
    return sum(int(m.weight.count_nonzero()) for m in layers) / sum(m.weight.numel() for m in layers)
