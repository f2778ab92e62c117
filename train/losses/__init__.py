"""The student's distillation losses (C-RADIOv4 recipe, ALGORITHMS.md §2–§5), one per file."""

from .damp import damp_call
from .mesa import mesa_loss
from .spatial import spatial_mse
from .summary import angle_loss

__all__ = ["angle_loss", "damp_call", "mesa_loss", "spatial_mse"]
