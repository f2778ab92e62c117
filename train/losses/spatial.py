"""Spatial MSE over the common positions Ω (C-RADIOv4's shift-equivariant loss, ALGORITHMS.md §3).

    L = mean over images with Ω ≠ ∅ of  (1/|Ω|) Σ_{u∈Ω} mean_c (pred_u − target_u)²

On a data-parallel rank the mean is over the global batch's images: each rank's share may hold another number of
images with Ω ≠ ∅, and the ranks' average of its loss (DDP's gradient, the logged value) is that mean.

The targets are PHI-S-normalized teacher features already resampled onto the student grid; cells
outside Ω have no teacher value and never reach the loss, not even through a NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from featcache.errors import UsageError

from .registry import register_loss

if TYPE_CHECKING:
    from featcache.train.distributed import Ranks
    from featcache.train.task import Step, Target


def spatial_mse(pred: Tensor, target: Tensor, omega: Tensor, ranks: Ranks | None = None) -> Tensor:
    """Mean over channels, then over Ω per image, then over the images whose Ω is not empty.

    ``pred`` and ``target`` are (B, h, w, C), ``omega`` is a (B, h, w) bool mask. With no cell in Ω
    anywhere the loss is a zero that stays connected to ``pred``'s graph (backward still works). With
    data-parallel ``ranks`` (a training batch's share) the images are counted over every rank's share, and the
    loss is this share's part, times the number of ranks (they average it).
    """
    _check_shapes(pred, target, omega)
    inside = omega.unsqueeze(-1)
    # Mask the difference, not the square: where() sends a zero gradient to the masked cells, so a
    # NaN target outside Ω cannot turn into a NaN gradient (NaN * 0).
    diff = torch.where(inside, pred - target, torch.zeros((), dtype=pred.dtype, device=pred.device))
    per_cell = diff.square().mean(dim=-1)  # (B, h, w)
    count = omega.flatten(1).sum(dim=1)  # (B,)
    per_image = per_cell.flatten(1).sum(dim=1) / count.clamp_min(1)
    used = (count > 0).to(per_image.dtype)
    # A sum over the used images, not indexing: no host sync on the training device.
    if ranks is None or not ranks.parallel:
        return (per_image * used).sum() / used.sum().clamp_min(1)
    return (per_image * used).sum() * ranks.world / ranks.sum(used.sum().detach()).clamp_min(1)


@register_loss("spatial", per_teacher=True, weight=lambda cfg, target: target.spatial,
               weight_key="[[teachers]] spatial")
def spatial_term(step: Step, target: Target) -> Tensor:
    """One teacher's spatial MSE: its dense head against its targets resampled onto the student grid."""
    aligned = step.targets(target)
    return spatial_mse(step.out.dense[target.name].float(), aligned, step.batch[target.name]["omega"], step.ranks)


def _check_shapes(pred: Tensor, target: Tensor, omega: Tensor) -> None:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise UsageError(f"pred and target must both be (B, h, w, C); got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if omega.dtype != torch.bool or omega.shape != pred.shape[:3]:
        raise UsageError(f"omega must be a bool (B, h, w) = {tuple(pred.shape[:3])} mask; got "
                         f"{omega.dtype} {tuple(omega.shape)}")
