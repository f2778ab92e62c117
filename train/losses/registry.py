"""The registry of distillation losses, by name (as timm registers models and the teachers register
their families): the training task (:mod:`featcache.train.task`) sums every registered loss that the
config gives a weight, so a new loss is one registered function and one config entry::

    @register_loss("tv", per_teacher=True)
    def tv(step, target):            # step: featcache.train.task.Step; target: the teacher (per_teacher)
        return ...                   # a scalar tensor, or None when it does not count on this batch

    [loss]
    terms = {tv = 0.1}               # its weight; "<teacher>/tv" appears in metrics.jsonl

The built-in losses take their weights where the config always kept them: ``spatial`` and ``summary``
from each ``[[teachers]]`` table, ``mesa`` from ``loss.mesa``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featcache.errors import UsageError
from featcache.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from featcache.train.config import TrainConfig
    from featcache.train.task import Step, Target

TERMS = "loss.terms"  # where a loss without a weight of its own finds it


@dataclass(frozen=True)
class Loss:
    """A registered loss: ``fn(step, target)`` gives its value (None: it does not count on this batch),
    once per teacher (``per_teacher``, logged as ``<teacher>/<name>``) or once per batch (``<name>``);
    ``weight(cfg, target)`` reads its weight from the config (None: the loss is not computed)."""

    name: str
    fn: Callable[[Step, Target | None], Tensor | None]
    per_teacher: bool
    weight: Callable[[TrainConfig, Target | None], float | None]
    weight_key: str  # where the config sets the weight, for error messages


LOSSES: Registry[Loss] = Registry("loss", "unknown {kind} {name}; known: {known}")


def register_loss(name: str, per_teacher: bool = False,
                  weight: Callable[[TrainConfig, Target | None], float | None] | None = None,
                  weight_key: str = TERMS):
    """Register the decorated ``fn(step, target)`` as loss ``name``; without ``weight`` its weight is
    ``loss.terms[name]`` and it is computed only when the config names it there."""
    def add(fn):
        if name in LOSSES or name == "loss" or not name.isidentifier():
            raise UsageError(f"cannot register loss {name!r}: the name is taken or not an identifier")
        LOSSES.add(name, Loss(name, fn, per_teacher, weight or (lambda cfg, target: cfg.loss.terms.get(name)), weight_key))
        return fn
    return add


def check_terms(terms: dict) -> None:
    """Refuse, in one line, a ``loss.terms`` entry that names no registered loss, one whose weight is set
    elsewhere, or a weight that is not a finite number >= 0."""
    for name, weight in terms.items():
        loss = LOSSES.get(name, TERMS)
        if loss.weight_key != TERMS:
            raise UsageError(f"{TERMS}: the weight of {name} is set by {loss.weight_key}, not here")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise UsageError(f"{TERMS}: the weight of {name} must be a number >= 0, not {weight!r}")
