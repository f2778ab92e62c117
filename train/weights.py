"""A run's checkpoint files and the bare student in them (what ``--init`` starts from and what
:mod:`featcache.train.product` wraps): found in today's checkpoint sets or in the pair of files runs
written before sets kept."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from featcache import checkpoint
from featcache.errors import UsageError
from featcache.runs import RunFolder, readable
from featcache.train.student import Student, StudentConfig, build_student

SET_WEIGHTS, SET_STATE = "student.safetensors", "state.safetensors"  # one checkpoint set's files
WEIGHTS, STATE = "{}.safetensors", "{}.state.safetensors"  # the pair of runs written before sets


def legacy_files(run: Path, name: str) -> tuple[Path, Path]:
    """Where runs written before checkpoint sets kept ``name``'s weights and state."""
    folder = run / "checkpoints"
    return folder / WEIGHTS.format(name), folder / STATE.format(name)


def checkpoint_files(run: Path, name: str) -> tuple[Path, Path] | None:
    """The weights and state files of checkpoint ``name`` (``last``, ``best``) of ``run``: its current
    set, else the pair an older featcache wrote; None when the run has neither."""
    found = RunFolder(Path(run)).current(name)
    if found is not None:
        return found[0] / SET_WEIGHTS, found[0] / SET_STATE
    weights, state = legacy_files(run, name)
    return (weights, state) if weights.exists() or state.exists() else None


def checkpoint_or_last(run: Path, which: str) -> tuple[Path, Path] | None:
    """:func:`checkpoint_files` of ``which``, else of ``last`` (a run evaluated never, or not yet)."""
    return checkpoint_files(run, which) or checkpoint_files(run, "last")


def load_bare_student(run: str | Path, which: str = "best") -> Student:
    """The bare trained student (outputs in the training targets' space) of run folder ``run`` (``best``,
    falling back to ``last``) or of a weights file, in eval mode: what ``--init`` starts from. For the
    student as a product (teacher-space outputs, its own preprocessing) use
    :func:`featcache.train.product.load_student`."""
    with readable(run) as local:  # a run folder on an object store: copied down for the read
        path = student_weights(local, which)
        meta = checkpoint.metadata(path)
        if meta.get("format") != "featcache-student-1":
            raise UsageError(f"{path if local == Path(run) else run} is not a featcache student checkpoint")
        return student_from(json.loads(meta["student"]), load_file(str(path)))


def student_weights(run: str | Path, which: str = "best") -> Path:
    """The student weights file of checkpoint ``which`` of run folder ``run`` (``last`` when it has no
    ``which``), or ``run`` itself when it is a file."""
    path = Path(run)
    if path.is_dir():
        found = checkpoint_or_last(path, which)
        if found is None:
            raise UsageError(f"{run} holds no checkpoint (no checkpoints/{which} or checkpoints/last)")
        path = found[0]
    return path


def student_from(architecture: dict, weights: dict[str, torch.Tensor]) -> Student:
    """A student built from its config dict (``StudentConfig.to_dict``) with ``weights`` loaded (strictly), in eval mode."""
    student = build_student(StudentConfig.from_dict(architecture))
    student.load_state_dict(weights)
    return student.eval()
