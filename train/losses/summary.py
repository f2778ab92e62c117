"""Balanced summary loss: squared angle over the teacher's angular dispersion (C-RADIOv4, ALGORITHMS.md §2).

    L_angle(x, y) = Θ(x, y)² / Disp,   Θ = arccos(clamp(cos(x, y), ±(1 − 1e-7)))

Dividing by Disp (read from the cached view's attrs) puts teachers whose summaries spread over
different angles on one scale.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from featcache.errors import UsageError

from .registry import register_loss

if TYPE_CHECKING:
    from featcache.train.task import Step, Target

_CLAMP = 1 - 1e-7  # as featcache.stats.dispersion, so the loss and its normalizer measure Θ alike


def angle_loss(x: Tensor, y: Tensor, dispersion: float) -> Tensor:
    """Batch mean of Θ(x, y)² / ``dispersion`` for student summaries x and teacher summaries y, both (B, C).

    Computed in at least float32. The clamp keeps the gradient finite when x ∥ y (where arccos' is
    infinite): inside the clamp the slope is bounded, past it the gradient is zero.
    """
    dispersion = _positive(dispersion)
    if x.ndim != 2 or x.shape != y.shape:
        raise UsageError(f"x and y must both be (B, C); got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    cos = F.cosine_similarity(x.to(dtype), y.to(dtype), dim=-1)
    theta = torch.acos(cos.clamp(-_CLAMP, _CLAMP))
    return theta.square().mean() / dispersion


def _summary_weight(cfg, target: Target) -> float | None:
    """``[[teachers]] summary``, for a teacher whose views have summaries and a weight above 0."""
    return target.summary if target.summary_channels and target.summary > 0 else None


@register_loss("summary", per_teacher=True, weight=_summary_weight, weight_key="[[teachers]] summary")
def summary_term(step: Step, target: Target) -> Tensor:
    """One teacher's summary angle loss over the dispersion of the view the batch was drawn from."""
    dispersion = target.dispersion[step.batch["partition"]]
    return angle_loss(step.out.summary[target.name].float(), step.batch[target.name]["summary"], dispersion)


def _positive(dispersion) -> float:
    if not (isinstance(dispersion, numbers.Real) and math.isfinite(dispersion) and dispersion > 0):
        raise UsageError(f"dispersion must be a finite number > 0, got {dispersion!r}")
    return float(dispersion)
