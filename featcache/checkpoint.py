"""Training checkpoints in safetensors, no pickle: weights, optimizer state, the RNG, metadata.

Shared by the student trainer (``featcache.train``) and the upsampler trainer
(``featcache.upsample.training``). An optimizer's state becomes tensors ``optim.<param>.<key>`` and
its parameter groups JSON metadata; every file is written whole to a temporary sibling and renamed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from featcache.errors import UsageError


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (moved to the CPU, made contiguous) and string ``metadata`` into ``path``, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a UsageError when it does not exist."""
    if not Path(path).exists():
        raise UsageError(f"{path} does not exist: nothing to resume or load")
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer's state as tensors and its parameter groups as metadata."""
    state = optimizer.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                      device: torch.device) -> None:
    """The inverse of :func:`optimizer_tensors` (``step`` counters stay on the CPU, as torch keeps them)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = value if k == "step" else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def warmup_cosine(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines log made after ``step`` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
