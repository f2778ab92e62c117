"""The trained student as a product (DESIGN.md §8): its outputs in each teacher's own space.

A checkpoint set (and the folder ``featcache export`` writes) carries, per teacher head, what maps the
student's outputs back to the teacher's space, and the student's input preprocessing, as timm's
``pretrained_cfg`` carries a model's::

    from featcache.train.product import load_student
    student = load_student("runs/r1")                    # or an exported folder
    out = student(image)                                 # a PIL image, a uint8 or a 0..1 float tensor
    out["dinov3"]["dense"]                               # (B, h, w, C) in the teacher's space
    out["siglip2"]["summary"]                            # (B, Cs) in the teacher's space

The maps, per view a head was trained on (ALGORITHMS.md §1, §2):

- dense, trained on PHI-S targets (``data.space = "phis"``): ``x = y R⁻ᵀ + μ`` with the view's frozen
  mean μ and inverse R⁻¹; trained on raw targets: the identity (PHI-S on request: ``y = (x − μ) Rᵀ``);
- summary: the angle loss leaves the norm free (summary targets are the raw cached summaries), so the
  teacher-space summary is the student's direction times the view's *summary scale*, the mean L2 norm
  of the teacher's cached summaries over the run's usable rows (at most :data:`SUMMARY_ROWS`, seeded):
  the one length that makes a typical student summary as long as a typical teacher summary, so a
  teacher's linear head (a probe, a text tower's logit scale) sees inputs of the size it was fitted on.

Dense outputs are channels-last ``(B, h, w, C)``, the cache's and the student's layout:
``reshape(B, -1, C)`` is the transformers teachers' ``(B, tokens, C)`` patch-token order (row-major).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from featcache import checkpoint
from featcache.errors import UsageError
from featcache.store.statsio import read_stats
from featcache.train.data import MEAN, STD
from featcache.train.evaluate import summaries_from_cache
from featcache.runs import readable
from featcache.train.weights import checkpoint_or_last, student_from

FORMAT = "featcache-student-product-1"  # the product file of a checkpoint set
EXPORT_FORMAT = "featcache-student-export-1"  # an exported folder's config.json
PRODUCT = "product.safetensors"  # its name in a checkpoint set
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
NORMALIZERS = ("mean", "rotation", "inverse")  # per view: μ, R (x -> PHI-S) and R⁻¹ (PHI-S -> x), float32
SUMMARY_ROWS = 4096  # rows whose summary norms give a view's summary scale
SPACES = ("teacher", "phis")


# ---- at save time: what the checkpoint carries ------------------------------------------------------


def describe(cfg, targets, cache, rows) -> tuple[dict[str, torch.Tensor], dict]:
    """The maps of a run's teacher heads: ``({"<view>/<normalizer>": float32 tensor}, config)``, the config
    holding the heads, the preprocessing and the source cache (read once per run: statistics are frozen)."""
    keys = sorted({key for t in targets for key in t.views.values()})
    maps = {f"{key}/{name}": value for key in keys for name, value in _normalizers(cache.views[key]).items()}
    heads = [_head(cfg, t, cache, rows) for t in targets]
    return maps, {"heads": heads, "preprocessing": preprocessing(cfg), "cache": cfg.cache}


def _normalizers(view) -> dict[str, torch.Tensor]:
    """The view's PHI-S mean, rotation and inverse as float32 tensors; none for a view without statistics."""
    if not view.stats:
        return {}
    stats = read_stats(view)
    return {name: torch.from_numpy(np.asarray(stats[name], dtype=np.float32)) for name in NORMALIZERS}


def _head(cfg, target, cache, rows) -> dict:
    """One teacher head's entry: its views per partition, the space its dense targets were in, channels
    and the summary scale per partition."""
    scales = ({part: summary_scale(cache.views[key], rows, cfg.seed) for part, key in target.views.items()}
              if target.summary_channels else {})
    return {"name": target.name, "views": dict(target.views), "space": cfg.data.space,
            "dense_channels": target.channels, "summary_channels": target.summary_channels, "summary_scale": scales}


def summary_scale(view, rows, seed: int = 0) -> float:
    """The mean L2 norm (float64) of ``view``'s cached summaries over ``rows`` (a seeded sample of
    :data:`SUMMARY_ROWS` of them when there are more)."""
    rows = np.asarray(rows)
    if len(rows) > SUMMARY_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, SUMMARY_ROWS, replace=False))
    with view.reader() as reader:  # the summary chunks alone, one read per shard
        summaries = summaries_from_cache(reader, rows).astype(np.float64)
    return float(np.mean(np.linalg.norm(summaries, axis=1)))


def preprocessing(cfg) -> dict:
    """The student's input rule, as timm's ``pretrained_cfg``: sides a multiple of ``multiple`` px (the
    patch, times the ViTDet window when windowed), 0..1 RGB standardized by ``mean``/``std``,
    antialiased bilinear resizing (the training crops' Pillow bilinear), the resolutions it trained at."""
    student = cfg.student
    window = student.get("vitdet_window_size") or 1
    res = cfg.resolution
    return {"patch": cfg.patch, "multiple": cfg.patch * window, "mean": list(MEAN), "std": list(STD),
            "interpolation": "bilinear", "input_size": [3, max(res.low), max(res.low)],
            "resolutions": {"low": list(res.low), "high": list(res.high) if res.high_prob > 0 else []}}


def save_maps(path: Path, maps: dict[str, torch.Tensor], config: dict) -> None:
    """The product file of a checkpoint set: the normalizers, the config as JSON metadata."""
    checkpoint.save(path, maps, {"format": FORMAT, "product": json.dumps(config)})


# ---- loading --------------------------------------------------------------------------------------


@dataclass
class Parts:
    """What a product is built from: the student's architecture and weights, the normalizers and the
    config (heads, preprocessing, cache, step)."""

    architecture: dict
    weights: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    config: dict


def load_student(run_or_dir: str | Path, which: str = "best", space: str = "teacher") -> "ProductStudent":
    """The trained student of a run folder (checkpoint ``which``, ``last`` when it has none) or of an
    exported folder, as a module in eval mode that takes images and returns each teacher's summary and
    dense features in the teacher's space (``space="phis"``: in PHI-S space)."""
    if space not in SPACES:
        raise UsageError(f"space {space!r}: give one of {', '.join(SPACES)}")
    with readable(run_or_dir) as path:  # a run folder on an object store: copied down for the read
        parts = read_export(path) if (path / EXPORT_CONFIG).is_file() else read_run(path, which, str(run_or_dir))
    return ProductStudent(student_from(parts.architecture, parts.weights), parts.config, parts.maps, space)


def read_run(run: Path, which: str = "best", name: str | None = None) -> Parts:
    """A run folder's checkpoint ``which`` (``last`` when it has none) as :class:`Parts`; a folder that is
    no run, or a checkpoint written before the maps were saved, is a one-line UsageError (naming the run
    ``name``, by default its path)."""
    found = checkpoint_or_last(run, which) if run.is_dir() else None
    if found is None:
        raise UsageError(f"{name or run} is not a training run (no checkpoints/{which} or checkpoints/last) nor an "
                         f"exported student (no {EXPORT_CONFIG})")
    maps_file = found[0].parent / PRODUCT
    if not maps_file.is_file():
        raise UsageError(f"{found[0].parent} has no {PRODUCT} (the maps to the teachers' spaces and the input "
                         "preprocessing; written by featcache since issue 25): its weights load only for --init")
    wmeta, pmeta = checkpoint.metadata(found[0]), checkpoint.metadata(maps_file)
    config = {**json.loads(pmeta["product"]), "step": int(wmeta.get("step", -1))}
    return Parts(json.loads(wmeta["student"]), load_file(str(found[0])), load_file(str(maps_file)), config)


def read_export(folder: Path) -> Parts:
    """An exported folder (:func:`export`) as :class:`Parts`."""
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{folder / EXPORT_CONFIG} is not a featcache student export (format "
                         f"{config.get('format')!r}, expected {EXPORT_FORMAT!r})")
    tensors = load_file(str(folder / EXPORT_WEIGHTS))
    weights = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    maps = {k.removeprefix("normalizers."): v for k, v in tensors.items() if k.startswith("normalizers.")}
    return Parts(config["architecture"], weights, maps, config)


# ---- export ---------------------------------------------------------------------------------------


def export(run: str | Path, out: str | Path, which: str = "best") -> Path:
    """Write run ``run``'s student (checkpoint ``which``) as a self-contained folder ``out``:
    ``model.safetensors`` (``student.*`` weights and ``normalizers.<view>/<name>``) and ``config.json``
    (architecture, heads, normalizers' names, preprocessing, step, source cache). It is written beside
    ``out`` and renamed into place: ``out`` is whole or absent. A non-run or a non-empty ``out`` is refused."""
    name, out = str(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder: give a new one")
    with readable(run) as run:  # a run folder on an object store: copied down for the read
        if (run / EXPORT_CONFIG).is_file():
            raise UsageError(f"{name} is already an exported student, not a training run")
        parts = read_run(run, which, name)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_export(tmp, parts)
        os.replace(tmp, out)  # onto an absent or empty folder: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(folder: Path, parts: Parts) -> None:
    folder.mkdir(parents=True)
    tensors = {**{f"student.{k}": v for k, v in parts.weights.items()},
               **{f"normalizers.{k}": v for k, v in parts.maps.items()}}
    checkpoint.save(folder / EXPORT_WEIGHTS, tensors, {"format": EXPORT_FORMAT})
    config = {"format": EXPORT_FORMAT, "architecture": parts.architecture, "normalizers": sorted(parts.maps),
              **{k: parts.config[k] for k in ("heads", "preprocessing", "step", "cache")}}
    (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))


# ---- the module -----------------------------------------------------------------------------------


def as_batch(images) -> torch.Tensor:
    """0..1 float32 ``(B, 3, H, W)`` from a PIL image, a uint8 or float tensor ((3, H, W) or (B, 3, H, W)),
    or a list of them (same size). uint8 is divided by 255; floats are taken as 0..1."""
    if isinstance(images, (list, tuple)):
        batch = [as_batch(i) for i in images]
        if len({b.shape[-2:] for b in batch}) > 1:
            raise UsageError("images of different sizes: resize them to one size first, or pass them one by one")
        return torch.cat(batch)
    if isinstance(images, Image.Image):
        images = torch.from_numpy(np.asarray(images.convert("RGB")).copy()).permute(2, 0, 1)
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise UsageError(f"give PIL images or (3, H, W) / (B, 3, H, W) tensors, not {_describe(images)}")
    images = images if images.ndim == 4 else images.unsqueeze(0)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise UsageError(f"pixels of dtype {images.dtype}: give uint8 (0..255) or float (0..1)")
    return images.float()


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def valid_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The size rule: each side rounded to the nearest multiple of ``multiple`` (halves up), at least one."""
    return tuple(max(multiple, int(side / multiple + 0.5) * multiple) for side in (height, width))


class ProductStudent(nn.Module):
    """A trained student that takes images and answers in its teachers' spaces (module docstring).

    ``forward(images, resize=False)``: ``resize=False`` runs the pixels at their size (each side a
    multiple of ``preprocessing["multiple"]``, else a UsageError naming the nearest sizes that work);
    ``True`` resizes to :func:`valid_size`; an int or ``(h, w)`` resizes to that size. Returns
    ``{teacher: {"summary": (B, Cs), "dense": (B, h, w, C)}}`` (the kinds the teacher has).
    """

    def __init__(self, student: nn.Module, config: dict, maps: dict[str, torch.Tensor], space: str = "teacher"):
        super().__init__()
        self.student, self.config, self.space = student, config, space
        self.heads, self.preprocessing = config["heads"], config["preprocessing"]
        self.maps = maps  # not parameters: the student's state dict stays exactly the trained one
        self.eval()

    def forward(self, images, resize: bool | int | tuple[int, int] = False) -> dict[str, dict[str, torch.Tensor]]:
        device = next(self.student.parameters()).device
        pixels = self._resized(as_batch(images).to(device), resize)
        out = self.student(self._standardized(pixels))
        part = self.partition(max(pixels.shape[-2:]))
        return {h["name"]: self._head(out, h, part) for h in self.heads}

    def _resized(self, pixels: torch.Tensor, resize) -> torch.Tensor:
        if resize is False or resize is None:
            return pixels
        if resize is True:
            size = valid_size(*pixels.shape[-2:], self.preprocessing["multiple"])
        else:
            size = (resize, resize) if isinstance(resize, int) else tuple(resize)
        if tuple(pixels.shape[-2:]) == size:
            return pixels
        return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)

    def _standardized(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.preprocessing["mean"], device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.preprocessing["std"], device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def partition(self, side: int) -> str:
        """The partition whose training resolutions hold the one nearest ``side`` px (the low one on a
        tie): its views' maps apply, as the student learnt that partition's targets at those sizes."""
        res = self.preprocessing["resolutions"]
        nearest = min(res["low"] + res["high"], key=lambda r: (abs(r - side), r not in res["low"]))
        return "low" if nearest in res["low"] else "high"

    def _head(self, out, head: dict, part: str) -> dict[str, torch.Tensor]:
        name, result = head["name"], {}
        if name in out.summary:
            result["summary"] = self._summary(out.summary[name], head, part)
        if name in out.dense:
            result["dense"] = self._dense(out.dense[name], head, head["views"][part])
        return result

    def _summary(self, s: torch.Tensor, head: dict, part: str) -> torch.Tensor:
        """Teacher space: the direction times the view's summary scale; PHI-S space: as the head outputs it
        (summaries have no PHI-S transform: the angle loss saw them raw)."""
        if self.space == "phis":
            return s
        return F.normalize(s.float(), dim=-1) * head["summary_scale"][part]

    def _dense(self, d: torch.Tensor, head: dict, view: str) -> torch.Tensor:
        trained = "phis" if head["space"] == "phis" else "teacher"
        if trained == self.space:
            return d
        mean, rotation, inverse = (self._map(view, n) for n in NORMALIZERS)
        if self.space == "teacher":
            return d.float() @ inverse.to(d.device).T + mean.to(d.device)
        return (d.float() - mean.to(d.device)) @ rotation.to(d.device).T

    def _map(self, view: str, name: str) -> torch.Tensor:
        if f"{view}/{name}" not in self.maps:
            raise UsageError(f"view {view} had no statistics when the student was saved: no PHI-S map for it")
        return self.maps[f"{view}/{name}"]
