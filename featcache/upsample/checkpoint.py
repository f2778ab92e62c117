"""An upsampler's checkpoint folder: what extraction and ``featsharp eval`` load.

    CKPT/featsharp.safetensors   the upsampler's weights and buffers (PHI-S statistics included)
    CKPT/featsharp.json          {upsampler, config, teacher (spec with its weights hash), step, heldout rule}
    CKPT/train.json              the training settings (``featsharp train`` only)
    CKPT/state.safetensors       optimizer, downsampler, uncertainty head, RNG (to resume training)
    CKPT/metrics.jsonl           one line per logged step

The checkpoint's hash (what a view records, and what resume compares) is the sha256 of the JSON
description and of every tensor of the weights file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from featcache import checkpoint
from featcache.errors import UsageError
from featcache.teachers.spec import TeacherSpec
from featcache.upsample.featsharp import FeatSharp, FeatSharpConfig

WEIGHTS, DESCRIPTION = "featsharp.safetensors", "featsharp.json"
FORMAT = "featcache-featsharp-1"


@dataclass(frozen=True)
class Description:
    """What a checkpoint says about itself."""

    config: FeatSharpConfig
    teacher: TeacherSpec
    step: int
    heldout: dict  # {"fraction", "seed"}: which image ids training never saw (see ``training.is_heldout``)
    sha256: str = ""

    def to_dict(self) -> dict:
        return {"upsampler": "featsharp", "format": FORMAT, "config": self.config.to_dict(),
                "teacher": self.teacher.to_dict(), "step": self.step, "heldout": self.heldout}


def save_upsampler(folder: Path, model: FeatSharp, teacher: TeacherSpec, step: int, heldout: dict) -> None:
    """The weights file, then the description (a reader finds them consistent once both exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    description = Description(model.config, teacher, step, heldout)
    checkpoint.save(folder / WEIGHTS, model.state_dict(), {"format": FORMAT, "step": str(step)})
    tmp = folder / (DESCRIPTION + ".tmp")
    tmp.write_text(json.dumps(description.to_dict(), indent=1))
    tmp.replace(folder / DESCRIPTION)


def describe_upsampler(folder: str | Path) -> Description:
    """A checkpoint's description and hash, without building the model; a UsageError when the folder
    holds none."""
    folder = Path(folder)
    if not (folder / DESCRIPTION).is_file() or not (folder / WEIGHTS).is_file():
        raise UsageError(f"{folder} is not an upsampler checkpoint (no {DESCRIPTION} + {WEIGHTS}): "
                         "make one with 'featcache featsharp train'")
    raw = (folder / DESCRIPTION).read_bytes()
    d = json.loads(raw)
    if d.get("format") != FORMAT:
        raise UsageError(f"{folder}: upsampler format {d.get('format')!r}, this featcache reads {FORMAT!r}")
    return Description(FeatSharpConfig.from_dict(d["config"]), TeacherSpec.from_dict(d["teacher"]), int(d["step"]),
                       d["heldout"], _digest(raw, folder / WEIGHTS))


def _digest(description: bytes, weights: Path) -> str:
    """sha256 of the description and of every tensor (name, dtype, shape, bytes, by name): the file's
    own bytes are not stable, as safetensors writes its metadata in no fixed order."""
    digest = hashlib.sha256(description)
    with safe_open(str(weights), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load_upsampler(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FeatSharp, Description]:
    """The upsampler of a checkpoint folder, in eval mode on ``device``, and its description."""
    description = describe_upsampler(folder)
    c = description.config.channels
    model = FeatSharp(description.config, (torch.zeros(c), torch.eye(c), torch.eye(c)))
    state = load_file(str(Path(folder) / WEIGHTS))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"{folder}: the weights do not fit the described upsampler: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), description
