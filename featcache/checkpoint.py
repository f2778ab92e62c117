"""Training checkpoints in safetensors, no pickle: weights, optimizer state, the RNG, metadata.

Shared by the student trainer (``featcache.train``) and the upsampler trainer
(``featcache.upsample.training``). An optimizer's state becomes tensors ``optim.<param>.<key>`` and
its parameter groups JSON metadata; every file is written whole to a temporary sibling and renamed.

A checkpoint of several files is a *set* (:func:`write_set`, :func:`read_set`): the files land in a
new folder ``set-<n>/`` beside the current one, then one small pointer ``current.json`` (naming the
folder and the set's meta) is replaced atomically, then older sets are removed. A reader follows the
pointer, so it sees the old set or the new one whole, whatever moment a SIGKILL strikes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from featcache.errors import UsageError


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (moved to the CPU, made contiguous) and string ``metadata`` into ``path``, atomically.

    safetensors reports a failed write (a full disk) as its own error: it becomes the OSError it
    wraps, so that the CLI says "no space left on device writing ..." in one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(e, path) from e
    os.replace(tmp, path)


def _os_error(e: SafetensorError, path: Path) -> Exception:
    """The OSError inside a safetensors write error ("I/O error: ... (os error 28)"), else ``e``."""
    found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(e))
    if found is None:
        return e
    code = int(found.group(1) or found.group(2))
    return OSError(code, os.strerror(code), str(path))


POINTER = "current.json"


def write_set(folder: Path, files: dict[str, Callable[[Path], None]], meta: dict) -> None:
    """Write a set of files into ``folder`` so that they all land together or not at all.

    ``files`` maps each file's name to a callable that writes it at the path it is given; ``meta``
    (JSON) travels in the pointer and comes back from :func:`read_set`. A failure part-way (a full
    disk, a kill) leaves the previous set current.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    current = read_set(folder)
    n = int(current[0].name.split("-")[1]) + 1 if current else 0
    new = folder / f"set-{n:07d}"
    shutil.rmtree(new, ignore_errors=True)  # a set a killed writer began, never made current
    new.mkdir()
    try:
        for name, write in files.items():
            write(new / name)
            _fsync(new / name)
        _fsync(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _replace_text(folder / POINTER, json.dumps({"set": new.name, "files": sorted(files), "meta": meta}))
    _remove_others(folder, new.name)


def read_set(folder: Path) -> tuple[Path, dict] | None:
    """The folder holding ``folder``'s current complete set and its meta, or None when it has none."""
    pointer = Path(folder) / POINTER
    if not pointer.is_file():
        return None
    try:  # replaced whole, never written in place: complete unless damaged by hand
        record = json.loads(pointer.read_text())
        path, files, meta = pointer.parent / record["set"], record["files"], record["meta"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{pointer} is damaged ({e}): it names the current checkpoint set") from None
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise UsageError(f"{path}: checkpoint files {', '.join(missing)} are missing (removed by hand?)")
    return path, meta


def _replace_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` after this returns, and held its old text at every moment before."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (the rename order must survive a power cut too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_set(folder: Path) -> None:
    """Remove the checkpoint set in ``folder`` (its pointer first, then every set), leaving the folder."""
    (folder / POINTER).unlink(missing_ok=True)
    _remove_others(folder, keep="")


def _remove_others(folder: Path, keep: str) -> None:
    """Sets older than ``keep`` and sets a killed writer left half-written: nothing points at them."""
    for path in folder.glob("set-*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a UsageError when it does not exist."""
    if not Path(path).exists():
        raise UsageError(f"{path} does not exist: nothing to resume or load")
    if not Path(path).is_file():
        raise UsageError(f"{path} is a folder, not a safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise UsageError(f"{path} is not a safetensors file (or is damaged): {e}") from None


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


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """Torch's RNG state for a checkpoint: the CPU generator (``rng.torch``) and, on a CUDA ``device``, that
    device's generator (``rng.cuda``), which draws what runs there (drop-path masks, the CPE's crops)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """The inverse of :func:`rng_tensors`. A state without ``rng.cuda`` (saved on the CPU) leaves a CUDA
    generator as the run seeded it, and ``rng.cuda`` is ignored on a CPU ``device``: either way the run
    resumes, exact only for the CPU's draws."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def warmup_cosine(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines log made after ``step`` (a resumed run logs them again), and
    a torn last line (a disk that filled, or a kill, while it was written)."""
    if not path.exists():
        return
    keep = [line for line in map(_record, path.read_text().splitlines()) if line and line[1]["step"] <= step]
    _replace_text(path, "".join(text + "\n" for text, _ in keep))


def _record(line: str) -> tuple[str, dict] | None:
    """A log line and its record; None for a blank or torn line."""
    try:
        return (line, json.loads(line)) if line.strip() else None
    except json.JSONDecodeError:
        return None
