"""DAMP: multiplicative weight noise during training (Trinh et al., "Improving robustness to corruptions
with multiplicative weight perturbations"; ALGORITHMS.md §5).

Each training forward uses W ⊙ (1 + σ·ε), ε ~ N(0, 1) drawn anew per call and per element, for the
weight of every nn.Linear and nn.Conv2d (biases, norms, embeddings and tokens stay clean). The noisy
weights are passed through ``torch.func.functional_call``, so the gradient reaches the clean W as
(1 + σ·ε) · ∂L/∂W̃ and the module itself (its parameters, its state_dict) is never changed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from featcache.errors import UsageError

DAMPED = (nn.Linear, nn.Conv2d)  # the layers whose weight gets noise


def damped_names(module: nn.Module) -> list[str]:
    """Names of the weights DAMP perturbs, in the order their noise is drawn (a tied weight once)."""
    names, seen = [], set()
    for prefix, layer in module.named_modules():
        if isinstance(layer, DAMPED) and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            names.append(f"{prefix}.weight" if prefix else "weight")
    return names


def damp_call(module: nn.Module, sigma: float, *args, generator: torch.Generator | None = None, **kwargs):
    """``module(*args, **kwargs)`` with DAMP noise of strength ``sigma`` on its Linear/Conv2d weights.

    Plain call when the module is in eval mode or ``sigma`` is 0. ``generator`` (on the weights'
    device) makes the noise reproducible; ε is drawn with ``torch.randn`` in ``damped_names`` order.
    """
    if not sigma >= 0:
        raise UsageError(f"DAMP sigma must be >= 0, got {sigma!r}")
    if sigma == 0 or not module.training:
        return module(*args, **kwargs)
    noisy = {name: _perturb(module.get_parameter(name), sigma, generator) for name in damped_names(module)}
    return functional_call(module, noisy, args, kwargs)


def _perturb(weight: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    eps = torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=weight.device)
    return weight * (1 + sigma * eps)
