"""An upsampler's checkpoint folder: what extraction and ``featsharp eval`` load.

    CKPT/featsharp.safetensors   the upsampler's weights and buffers (PHI-S statistics included)
    CKPT/featsharp.json          {upsampler, config, teacher (spec with its weights hash), step, heldout rule}
    CKPT/train.json              the training settings (``featsharp train`` only)
    CKPT/state.safetensors       optimizer, downsampler, uncertainty head, RNG (to resume training)
    CKPT/metrics.jsonl           one line per logged step

The checkpoint's hash (what a view records, and what resume compares) is the sha256 of the weights
file and of the JSON description together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
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
    digest = hashlib.sha256(raw)
    with open(folder / WEIGHTS, "rb") as f:
        digest.update(hashlib.file_digest(f, "sha256").digest())
    return Description(FeatSharpConfig.from_dict(d["config"]), TeacherSpec.from_dict(d["teacher"]), int(d["step"]),
                       d["heldout"], "sha256:" + digest.hexdigest())


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
