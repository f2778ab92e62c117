"""Exponential moving average of the student's weights: the EMA student that MESA compares against
(C-RADIOv4, ALGORITHMS.md §4). Decay and start step are the caller's (config values)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from featcache.errors import UsageError


class EMA:
    """A frozen copy of a model, moved toward it by ``update``; forward through ``.module``.

    The copy starts from the model's weights, never gets gradients and is in eval mode (call
    ``ema.module.train()`` to change that).
    """

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """ema ← decay·ema + (1 − decay)·model for parameters; buffers (e.g. norm statistics) are copied."""
        if not 0 <= decay <= 1:
            raise UsageError(f"EMA decay must be in [0, 1], got {decay!r}")
        for mine, theirs in zip(self.module.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs, 1 - decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights, for the checkpoint."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMA weights from a checkpoint (strict: every key must match)."""
        self.module.load_state_dict(state)
