"""An upsampler's checkpoint: what extraction and ``featsharp eval`` load, from a ``featsharp train``
run folder (:mod:`featcache.runs`)::

    RUN/config.toml                                   the training settings
    RUN/metrics.jsonl                                 one line per logged step
    RUN/checkpoints/last/current.json                 the pointer to the current checkpoint set
    RUN/checkpoints/last/set-<n>/featsharp.safetensors the upsampler's weights and buffers (PHI-S statistics included)
    RUN/checkpoints/last/set-<n>/featsharp.json       {upsampler, config, teacher (spec with its weights hash), step, heldout rule}
    RUN/checkpoints/last/set-<n>/state.safetensors    optimizer, downsampler, uncertainty head, RNG (to resume training)

A step's files are written as one set (a new ``set-<n>/``, then the pointer replaced): whenever a
run is killed, a reader (``extract``, ``eval``, ``--resume``) finds the previous step's files or the
new step's, never a mix. Folders of the earlier layouts are still read (and resumed in their layout):
``train.json`` with the pointer and sets in RUN itself, and before that the files in RUN itself.

The checkpoint's hash (what a view records, and what resume compares) is the sha256 of the JSON
description and of every tensor of the weights file: it does not depend on the layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from featcache import checkpoint, configfile
from featcache.errors import UsageError
from featcache.runs import CHECKPOINTS
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


def save_upsampler(folder: Path, model: FeatSharp, teacher: TeacherSpec, step: int, heldout: dict,
                   more: dict[str, Callable[[Path], None]] | None = None) -> None:
    """The weights and description (and the writers of ``more`` files, such as the training state)
    as one checkpoint set of ``folder``, then the files of the first layout removed (now stale)."""
    description = json.dumps(Description(model.config, teacher, step, heldout).to_dict(), indent=1)
    files = {WEIGHTS: lambda p: checkpoint.save(p, model.state_dict(), {"format": FORMAT, "step": str(step)}),
             DESCRIPTION: lambda p: p.write_text(description), **(more or {})}
    checkpoint.write_set(folder, files, {"step": step})
    for name in files:
        (folder / name).unlink(missing_ok=True)


def current(folder: str | Path) -> Path:
    """The folder holding a checkpoint's files now: the current set of a run folder's
    ``checkpoints/last``, else of ``folder`` itself (an older run folder, or a ``checkpoints/last``
    given directly), else ``folder`` (the first layout, or a set folder given directly)."""
    folder = Path(folder)
    for where in (folder / CHECKPOINTS / "last", folder):
        try:
            found = checkpoint.read_set(where)
        except (ValueError, KeyError, TypeError) as e:  # a pointer edited by hand (it is never torn)
            raise UsageError(f"{where / checkpoint.POINTER} is damaged ({_reason(e)}): train the upsampler "
                             "again") from None
        if found:
            return found[0]
    return folder


def describe_upsampler(folder: str | Path) -> Description:
    """A checkpoint's description and hash, without building the model; a UsageError when the folder
    holds none, or when its description or weights are damaged or do not fit each other."""
    folder = current(folder)
    if not (folder / DESCRIPTION).is_file() or not (folder / WEIGHTS).is_file():
        raise UsageError(f"{folder} is not an upsampler checkpoint (no {DESCRIPTION} + {WEIGHTS}): "
                         "make one with 'featcache featsharp train'")
    raw = (folder / DESCRIPTION).read_bytes()
    d = _parse(folder / DESCRIPTION, raw)
    return dataclasses.replace(d, sha256=_checked_digest(folder / WEIGHTS, raw, d.config))


def _parse(path: Path, raw: bytes) -> Description:
    """The description in ``raw`` (the bytes of ``path``), every field checked."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        if d.get("format") != FORMAT:
            raise UsageError(f"{path.parent}: upsampler format {d.get('format')!r}, this featcache reads {FORMAT!r}")
        config, heldout = FeatSharpConfig.from_dict(d["config"]), d["heldout"]
        problem = configfile.misfit(config) or _heldout_problem(heldout)
        if problem or not isinstance(d["step"], int) or d["step"] < 0:
            raise TypeError(problem or f"step {d['step']!r} is not a count")
        return Description(config, TeacherSpec.from_dict(d["teacher"]), d["step"], heldout)
    except UsageError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path} is damaged ({_reason(e)}): train the upsampler again") from None


def _heldout_problem(heldout) -> str | None:
    if not isinstance(heldout, dict) or not isinstance(heldout.get("fraction"), (int, float)) \
            or not isinstance(heldout.get("seed"), int):
        return f"heldout {json.dumps(heldout)} is not {{fraction, seed}}"
    return None


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"no {text}" if isinstance(e, KeyError) else text


def _checked_digest(weights: Path, description: bytes, config: FeatSharpConfig) -> str:
    """The checkpoint's hash, once every tensor the upsampler needs is in ``weights`` with its dtype and
    shape (checked from the header, before a tensor is read) and no other is."""
    expected = _expected_tensors(config)
    try:
        with safe_open(str(weights), "pt") as f:
            _check_tensors(weights, {k: f.get_slice(k) for k in f.keys()}, expected)
        return _digest(description, weights)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{weights} is damaged ({_reason(e)}): train the upsampler again") from None


def _expected_tensors(config: FeatSharpConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, shape) of the upsampler's state, from a model built on the meta device (no memory)."""
    c = config.channels
    with torch.device("meta"):
        model = FeatSharp(config, (torch.zeros(c), torch.eye(c), torch.eye(c)))
    return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def _check_tensors(weights: Path, found: dict, expected: dict) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise UsageError(f"{weights} does not fit the described upsampler: it "
                         + "; ".join(filter(None, [missing and f"lacks {', '.join(missing[:3])}",
                                                   extra and f"holds unexpected {', '.join(extra[:3])}"])))
    for name, (dtype, shape) in expected.items():
        raw, got_shape = found[name].get_dtype(), tuple(found[name].get_shape())
        if _DTYPES.get(raw) != dtype:
            raise UsageError(f"{weights}: {name} is {_name(_DTYPES[raw]) if raw in _DTYPES else raw}, "
                             f"the upsampler needs {_name(dtype)}")
        if got_shape != shape:
            raise UsageError(f"{weights}: {name} has shape {got_shape}, the upsampler needs {shape}")


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    folder = current(folder)  # once: a run still training may make another set current meanwhile
    description = describe_upsampler(folder)
    c = description.config.channels
    model = FeatSharp(description.config, (torch.zeros(c), torch.eye(c), torch.eye(c)))
    state = load_file(str(Path(folder) / WEIGHTS))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"{folder}: the weights do not fit the described upsampler: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), description
