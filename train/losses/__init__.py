"""The student's distillation losses (C-RADIOv4 recipe, ALGORITHMS.md §2–§5), one per file, each
registered by name (:mod:`.registry`) for the training task to sum with its configured weight."""

from .damp import damp_call
from .registry import LOSSES, Loss, check_terms, register_loss
from .spatial import spatial_mse
from .summary import angle_loss
from .mesa import mesa_loss

__all__ = ["LOSSES", "Loss", "angle_loss", "check_terms", "damp_call", "mesa_loss", "register_loss", "spatial_mse"]
