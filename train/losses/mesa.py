"""Shift-equivariant MESA: match the student to an EMA student that saw another crop (C-RADIOv4, ALGORITHMS.md §4).

    L_mesa(x, x̃) = (1/|Ω|) Σ_{u∈Ω} ( F_{S→S̃}[LN(x)]_u − LN(x̃)_u )²

LN is a layer norm without affine parameters; F_{S→S̃} resamples the student's field onto the EMA
student's grid with the same footprint-averaged lookup that aligns teacher targets (DESIGN.md §3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from featcache import geometry
from featcache.errors import UsageError

from .registry import register_loss
from .spatial import spatial_mse

if TYPE_CHECKING:
    from featcache.train.distributed import Ranks
    from featcache.train.task import Step


def mesa_loss(x: Tensor, x_ema: Tensor, maps: Tensor, omega: Tensor, ranks: Ranks | None = None) -> Tensor:
    """MESA loss between student features x (B, h, w, D) and EMA features x_ema (B, h2, w2, D).

    ``maps`` (B, 4) = [sx, tx, sy, ty] takes EMA-grid coordinates to student-grid coordinates, as
    ``crop_to_crop_map(ema_box, ema_grid, ema_flip, student_box, student_grid, student_flip).as_array()``;
    ``omega`` (B, h2, w2) marks the EMA cells whose centre lies in the student's crop. Only x gets a
    gradient: the EMA side is a target. ``ranks``: a data-parallel share's part (:func:`spatial_mse`).
    """
    _check_shapes(x, x_ema, maps)
    batch, h, w, depth = x.shape
    student = F.layer_norm(x, (depth,)).permute(0, 3, 1, 2)  # (B, D, h, w): the lookup's window layout
    target = F.layer_norm(x_ema.detach(), (depth,))
    extents = torch.tensor([h, w], dtype=torch.long, device=x.device).expand(batch, 2)
    aligned = geometry.lookup_targets(student, maps, extents, tuple(x_ema.shape[1:3]))
    return spatial_mse(aligned.permute(0, 2, 3, 1), target, omega, ranks)


@register_loss("mesa", weight=lambda cfg, target: cfg.loss.mesa if cfg.loss.mesa > 0 else None,
               weight_key="loss.mesa")
def mesa_term(step: Step, target: None) -> Tensor | None:
    """MESA of a training batch from step ``loss.mesa_start`` on: the student on its crop against the
    EMA student on the batch's second crop (no EMA forward before: its loss would not count)."""
    if step.step is None or step.step < step.cfg.loss.mesa_start:
        return None
    ema = step.ema_output()
    return mesa_loss(step.out.features.float(), ema.features.float(), step.batch["mesa"]["map"],
                     step.batch["mesa"]["omega"], step.ranks)


def _check_shapes(x: Tensor, x_ema: Tensor, maps: Tensor) -> None:
    if x.ndim != 4 or x_ema.ndim != 4 or x.shape[0] != x_ema.shape[0] or x.shape[3] != x_ema.shape[3]:
        raise UsageError(f"x and x_ema must be (B, h, w, D) and (B, h2, w2, D); got {tuple(x.shape)} "
                         f"and {tuple(x_ema.shape)}")
    if maps.shape != (x.shape[0], 4):
        raise UsageError(f"maps must be (B, 4) = ({x.shape[0]}, 4) [sx, tx, sy, ty]; got {tuple(maps.shape)}")
