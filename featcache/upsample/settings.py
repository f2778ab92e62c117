"""The settings of a FeatSharp training run: typed, checked before anything is loaded or written.

A value can come from a config file (TOML or YAML), a flag, ``--set key=value`` (read as ``featcache
train`` reads it: :mod:`featcache.configfile`) or a run folder's ``config.toml`` (``--resume``; a
``train.json`` in runs written before): each is checked against its field's type and range here, so a
bad one is refused in one line naming the key, never deep inside the training step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from featcache import configfile
from featcache.devices import resolve_device
from featcache.errors import UsageError
from featcache.teachers.views import POLICIES
from featcache.upsample.warp import Jitter

DEVICES = ("auto", "cpu", "cuda")
#: integer settings that must be at least 1, and numbers that must be at least 0
POSITIVE = ("steps", "batch_size", "views", "factor", "window", "heads", "key_dim", "stats_images", "log_every",
            "save_every")
NON_NEGATIVE = ("min_lr", "warmup", "seam_weight", "rotate", "shift", "perspective", "seed")


@dataclass(frozen=True)
class Settings:
    """One training run; every field can be given on the command line."""

    family: str
    source: str
    images: str
    revision: str | None = None
    steps: int = 2000
    batch_size: int = 4  # canvases per step
    views: int = 2  # jittered views per canvas
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 100
    factor: int = 3
    window: int = 7
    heads: int = 8
    key_dim: int = 32
    mlp_ratio: float = 1.0
    heldout: float = 0.1  # the fraction of image ids never trained on (``eval`` uses them)
    stats_images: int = 64  # images the teacher's PHI-S statistics are fitted on
    seam_weight: float = 1.0  # extra weight of the cells next to a tile seam
    zoom: tuple[float, float] = (0.95, 1.05)
    rotate: float = 5.0
    shift: float = 0.03
    perspective: float = 0.02
    policy: str = "squash"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 200

    def __post_init__(self):
        problem = configfile.misfit(self)
        if problem:
            raise UsageError(f"featsharp settings: {problem}")
        object.__setattr__(self, "zoom", tuple(self.zoom))
        _check_ranges(self)

    @property
    def jitter(self) -> Jitter:
        return Jitter(self.zoom, self.rotate, self.shift, self.perspective)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "zoom": list(self.zoom)}

    def to_toml(self) -> str:
        return configfile.to_toml(self.to_dict())


def _check_ranges(s: Settings) -> None:
    """Values a run cannot use, refused before anything is loaded (zero steps, a negative rate, ...)."""
    for name in POSITIVE:
        if getattr(s, name) < 1:
            raise UsageError(f"featsharp setting {name} must be >= 1, not {getattr(s, name)}")
    for name in NON_NEGATIVE:
        if getattr(s, name) < 0:
            raise UsageError(f"featsharp setting {name} must be >= 0, not {getattr(s, name)}")
    if not s.lr > 0 or not s.mlp_ratio > 0:
        raise UsageError(f"featsharp settings lr and mlp_ratio must be > 0, not {s.lr} and {s.mlp_ratio}")
    if s.min_lr > s.lr:
        raise UsageError(f"featsharp setting min_lr ({s.min_lr}) must not exceed lr ({s.lr})")
    if not 0 <= s.heldout < 1:
        raise UsageError(f"featsharp setting heldout must be in [0, 1), not {s.heldout}")
    if not 0 < s.zoom[0] <= s.zoom[1]:
        raise UsageError(f"featsharp setting zoom must be [low, high] with 0 < low <= high, not {list(s.zoom)}")
    if s.window % 2 == 0:  # the neighbourhood needs a centre: refused before the teacher loads
        raise UsageError(f"featsharp setting window must be odd, not {s.window}")
    _choice("policy", s.policy, POLICIES)
    _choice("device", s.device, DEVICES)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"featsharp setting {name} {value!r} is not one of {', '.join(choices)}")


def torch_device(name: str) -> torch.device:
    """The device a run or an evaluation asked for (``auto``: CUDA when there is one); a UsageError
    when it asks for CUDA on a machine without it, before any model is built."""
    _choice("device", name, DEVICES)
    return resolve_device(name)


def settings_from(teacher: str | None, images: str | None, flags: dict, overrides: list[str],
                  config: str | None = None) -> Settings:
    """Settings from the command line: the ``config`` file (TOML or YAML, the settings' own keys), then
    ``--teacher`` (family=,source=[,revision=] or preset=), the images, the named flags (None: the
    default) and ``--set key=value`` pairs (:func:`featcache.configfile.parse_value`)."""
    values = configfile.read(config) if config else {}
    values.update({**(_teacher(teacher) if teacher else {}), **({"images": images} if images else {}),
                   **{k: v for k, v in flags.items() if v is not None}})
    configfile.apply_overrides(values, overrides)
    return from_dict(values, config or "featsharp settings")


def from_dict(values: dict, where: str) -> Settings:
    """Settings from a dict (the command line's, or a run folder's saved config); unknown or missing
    keys are refused in one line, as is a value of the wrong type."""
    if not isinstance(values, dict):
        raise UsageError(f"{where}: expected a JSON object of settings, not {type(values).__name__}")
    return configfile.build(Settings, values, where)


def load(path: str | Path) -> Settings:
    """The settings a run folder saved (its ``config.toml``)."""
    return from_dict(configfile.read(str(path)), str(path))


def _teacher(text: str) -> dict:
    from featcache.extract.config import parse_teacher_flag
    from featcache.teachers.presets import preset

    t = parse_teacher_flag(text)
    if "preset" in t:
        p = preset(t.pop("preset"))
        t = {"family": p.family, "source": p.source, **t}
    unknown = set(t) - {"family", "source", "revision"}
    if unknown or not {"family", "source"} <= set(t):
        raise UsageError(f"--teacher {text!r}: give family=,source=[,revision=] or preset= (not {sorted(unknown)})")
    return t
