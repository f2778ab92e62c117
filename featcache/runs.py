"""A training run's folder, one layout and one set of resume rules for every trainer (``featcache
train``, ``featcache featsharp train``)::

    RUN/config.toml            the resolved config: the run can be read and repeated without its file
    RUN/checkpoints/<name>/    a checkpoint set (:func:`featcache.checkpoint.write_set`): last, best
    RUN/metrics.jsonl          one JSON object per logged step and per evaluation

The rules (:meth:`RunFolder.plan`, :meth:`RunFolder.start`):

- a new run refuses a folder that holds a run (a ``last`` checkpoint); a folder without one (a failed
  start, a kill before the first checkpoint) is taken over, its metrics and checkpoints removed;
- ``--resume`` trains with the folder's own config (another one is refused) from its ``last``
  checkpoint, its metrics cut back to that step; with no checkpoint yet it starts at step 0; a
  finished run is refused, saying how to go on.

Folders an older featcache wrote keep their own :class:`Layout` (FeatSharp's ``train.json`` with the
checkpoint set in the folder itself) and are resumed in it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featcache import checkpoint
from featcache.errors import UsageError

CONFIG, CHECKPOINTS, METRICS = "config.toml", "checkpoints", "metrics.jsonl"


@dataclass(frozen=True)
class Layout:
    """Where a run folder keeps its config and its ``last`` checkpoint set, relative to the folder."""

    config: str = CONFIG
    last: str = f"{CHECKPOINTS}/last"


def local_folder(out: str | Path) -> Path:
    """``out`` as a local run folder; an object-store URL or a file is refused (training writes local files)."""
    if "://" in str(out):
        raise UsageError(f"--out {out}: a run folder must be a local path (training does not write to object "
                         "stores yet); train into a local folder and copy it")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run folder")
    return out


def refuse_flags(resumable: Callable[[], object], only: str) -> None:
    """Refuse ``--resume`` given other flags (``only`` says what it takes), after what :func:`resumable`
    says of the folder (a finished run: how to go on), in one line."""
    try:
        resumable()
    except UsageError as e:
        raise UsageError(f"{e}; and --resume takes {only}") from None
    raise UsageError(f"--resume continues the run in --out with its own config: {only}")


@dataclass
class RunFolder:
    """One run's folder. ``kind`` names the trainer in messages ("FeatSharp "; "" for the student's)."""

    path: Path
    kind: str = ""
    layout: Layout = field(default_factory=Layout)

    @classmethod
    def open(cls, out: str | Path, kind: str = "", older: tuple[Layout, ...] = ()) -> "RunFolder":
        """The folder ``out`` in the layout its config file shows (the current one when it has none)."""
        path = local_folder(out)
        found = [o for o in older if not (path / CONFIG).exists() and (path / o.config).exists()]
        return cls(path, kind, found[0] if found else Layout())

    @property
    def config(self) -> Path:
        return self.path / self.layout.config

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def checkpoints(self, name: str) -> Path:
        """The folder of checkpoint set ``name`` (``last``, ``best``)."""
        return self.path / (self.layout.last if name == "last" else f"{CHECKPOINTS}/{name}")

    def current(self, name: str) -> tuple[Path, dict] | None:
        """The current set of checkpoint ``name`` and its meta; None when there is none."""
        return checkpoint.read_set(self.checkpoints(name))

    def save(self, name: str, files: dict[str, Callable[[Path], None]], step: int) -> None:
        """Checkpoint ``name`` at ``step``: ``files`` written as one set (whole, or the previous one stays)."""
        checkpoint.write_set(self.checkpoints(name), files, {"step": step})

    def append(self, record: dict) -> None:
        """One line of ``metrics.jsonl``."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plan(self, cfg, resume: bool, read: Callable[[Path], object], last_step: Callable[[], int] | None,
             steps: Callable[[object], int], further: Callable[[object], str]) -> tuple[object, int | None]:
        """The config the run trains with and the step of the checkpoint it resumes (None: it starts at
        step 0), checked before anything is written. ``read`` reads a saved config; ``last_step`` gives
        the step of the folder's ``last`` checkpoint (None: it has none); ``steps`` is a config's length
        and ``further`` says how to go on from a finished run of a config."""
        if not resume:
            if cfg is None:
                raise UsageError("a new run needs a config")
            if last_step is not None:
                raise UsageError(f"{self.path} already holds a {self.kind}run: --resume to continue it, or "
                                 "choose another --out")
            return cfg, None
        if not self.config.exists():
            raise UsageError(f"{self.path} holds no {self.kind}run to resume (no {self.layout.config})")
        own = read(self.config)
        if cfg is not None and cfg.to_dict() != own.to_dict():
            raise UsageError(f"--resume continues {self.path} with its own {self.layout.config}; give no other "
                             "config or flags")
        step = None if last_step is None else last_step()
        if step is not None and step >= steps(own):
            raise UsageError(f"{self.path} already finished its {steps(own)} steps; {further(own)}")
        return own, step

    def start(self, config_text: str, stream, more: tuple[str, ...] = ()) -> None:
        """Create the folder and write the resolved config (whole or absent); a folder that holds no
        checkpoint is taken over: its metrics, checkpoints and ``more`` folders removed first."""
        if self.config.exists():
            print(f"{self.path} holds a run that stopped before its first checkpoint: starting it over",
                  file=stream, flush=True)
            self.clear(more)
            if self.layout != Layout():  # an older layout's folder: the new run writes today's
                self.config.unlink()
                self.layout = Layout()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_name(self.config.name + ".tmp")
        tmp.write_text(config_text)
        os.replace(tmp, self.config)

    def restart(self, stream, more: tuple[str, ...] = ()) -> None:
        """``--resume`` of a folder with no checkpoint yet: its config alone starts the run again."""
        print(f"{self.path} holds no checkpoint yet: starting its run from step 0", file=stream, flush=True)
        self.clear(more)

    def clear(self, more: tuple[str, ...] = ()) -> None:
        """Remove what a run logged and saved (its config stays)."""
        self.metrics.unlink(missing_ok=True)
        for folder in (CHECKPOINTS, *more):
            shutil.rmtree(self.path / folder, ignore_errors=True)
        if self.layout != Layout():  # an older layout's checkpoint set lies in the folder itself
            checkpoint.remove_set(self.checkpoints("last"))

    def resumed(self, step: int, stream) -> None:
        """Cut the metrics back to ``step`` (the resumed run logs the later steps again) and say so."""
        checkpoint.truncate_metrics(self.metrics, step)
        print(f"resuming {self.path} at step {step}", file=stream, flush=True)
