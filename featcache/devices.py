"""The torch device a command asked for, refused in one line when this machine cannot give it.

Shared by ``featcache train`` and ``featcache featsharp train/eval``, so both say the same thing before
any model or folder is made (``extract`` asks its Ray cluster instead: the GPUs are the workers').
"""

from __future__ import annotations

import torch

from featcache.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when torch sees it, else the CPU; ``cuda[:N]`` without such a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device must be auto, cpu or cuda[:N], not {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but torch sees no CUDA device here: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device
