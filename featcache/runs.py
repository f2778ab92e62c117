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

A student's run folder may be an object-store URL (``--out s3://bucket/runs/r1``): the run writes a local copy
as it writes any folder, and :class:`Mirror` uploads each change as it is made (DESIGN.md §5).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from featcache import checkpoint
from featcache.errors import UsageError

CONFIG, CHECKPOINTS, METRICS = "config.toml", "checkpoints", "metrics.jsonl"


@dataclass(frozen=True)
class Layout:
    """Where a run folder keeps its config and its ``last`` checkpoint set, relative to the folder."""

    config: str = CONFIG
    last: str = f"{CHECKPOINTS}/last"


def is_url(out: str | Path) -> bool:
    return "://" in str(out)


def local_folder(out: str | Path) -> Path:
    """``out`` as a local run folder; an object-store URL (where this trainer writes local files only) or a file
    is refused."""
    if is_url(out):
        raise UsageError(f"--out {out}: this trainer's run folder must be a local path (it does not write to "
                         "object stores); train into a local folder and copy it")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run folder")
    return out


@contextlib.contextmanager
def readable(run: str | Path) -> Iterator[Path]:
    """A run folder to read from, for the block: a local path as it is; one at an object-store URL copied down
    (its config, metrics and current checkpoint sets: :class:`Mirror`), the copy removed afterwards."""
    if not is_url(run):
        yield Path(run)
        return
    with RunFolder.open(run, remote=True) as folder:
        yield folder.path


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
    mirror: Mirror | None = None  # a folder at an object-store URL: ``path`` is its local copy

    @classmethod
    def open(cls, out: str | Path, kind: str = "", older: tuple[Layout, ...] = (), remote: bool = False,
             checkpoints: bool = True) -> "RunFolder":
        """The folder ``out`` in the layout its config file shows (the current one when it has none). With
        ``remote``, ``out`` may be an object-store URL: what a resume reads is copied down (:class:`Mirror`;
        without ``checkpoints``, its config and metrics only), and :meth:`close` removes the copy."""
        if remote and is_url(out):
            mirror = Mirror(str(out), checkpoints)
            return cls(mirror.local, kind, Layout(), mirror)
        path = local_folder(out)
        found = [o for o in older if not (path / CONFIG).exists() and (path / o.config).exists()]
        return cls(path, kind, found[0] if found else Layout())

    @property
    def name(self) -> str:
        """The folder as the user named it: its URL, or its path."""
        return self.mirror.url if self.mirror else str(self.path)

    def close(self, upload: bool = True) -> None:
        """Upload (``upload``: the process that wrote the run) what changed since the last checkpoint (metrics,
        pictures, logs) and remove the local copy of a folder on an object store; nothing for a local one."""
        if self.mirror is not None:
            try:
                if upload:
                    self.mirror.push_changes()
            finally:
                self.mirror.close()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close(upload=False)  # a folder only read (a plan, a result): nothing to upload

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
        """Checkpoint ``name`` at ``step``: ``files`` written as one set (whole, or the previous one stays); on an
        object store uploaded at once, with the metrics and whatever else changed."""
        checkpoint.write_set(self.checkpoints(name), files, {"step": step})
        if self.mirror is not None:
            self.mirror.push_metrics(now=True)  # before the pointer: a resume from it finds the steps before it
            self.mirror.push_set(self.checkpoints(name))
            self.mirror.push_changes()

    def append(self, record: dict) -> None:
        """One line of ``metrics.jsonl`` (on an object store, uploaded at most every :data:`Mirror.EVERY_S`)."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror.push_metrics()

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
                raise UsageError(f"{self.name} already holds a {self.kind}run: --resume to continue it, or "
                                 "choose another --out")
            return cfg, None
        if not self.config.exists():
            raise UsageError(f"{self.name} holds no {self.kind}run to resume (no {self.layout.config})")
        own = read(self.config)
        if cfg is not None and cfg.to_dict() != own.to_dict():
            raise UsageError(f"--resume continues {self.name} with its own {self.layout.config}; give no other "
                             "config or flags")
        step = None if last_step is None else last_step()
        if step is not None and step >= steps(own):
            raise UsageError(f"{self.name} already finished its {steps(own)} steps; {further(own)}")
        return own, step

    def start(self, config_text: str, stream, more: tuple[str, ...] = ()) -> None:
        """Create the folder and write the resolved config (whole or absent); a folder that holds no
        checkpoint is taken over: its metrics, checkpoints and ``more`` folders removed first."""
        if self.config.exists():
            print(f"{self.name} holds a run that stopped before its first checkpoint: starting it over",
                  file=stream, flush=True)
            self.clear(more)
            if self.layout != Layout():  # an older layout's folder: the new run writes today's
                self.config.unlink()
                self.layout = Layout()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_name(self.config.name + ".tmp")
        tmp.write_text(config_text)
        os.replace(tmp, self.config)
        if self.mirror is not None:
            self.mirror.push(self.config)

    def restart(self, stream, more: tuple[str, ...] = ()) -> None:
        """``--resume`` of a folder with no checkpoint yet: its config alone starts the run again."""
        print(f"{self.name} holds no checkpoint yet: starting its run from step 0", file=stream, flush=True)
        self.clear(more)

    def clear(self, more: tuple[str, ...] = ()) -> None:
        """Remove what a run logged and saved (its config stays)."""
        self.metrics.unlink(missing_ok=True)
        for folder in (CHECKPOINTS, *more):
            shutil.rmtree(self.path / folder, ignore_errors=True)
        if self.mirror is not None:
            self.mirror.remove((METRICS, CHECKPOINTS, *more))
        if self.layout != Layout():  # an older layout's checkpoint set lies in the folder itself
            checkpoint.remove_set(self.checkpoints("last"))

    def resumed(self, step: int, stream) -> None:
        """Cut the metrics back to ``step`` (the resumed run logs the later steps again) and say so."""
        checkpoint.truncate_metrics(self.metrics, step)
        if self.mirror is not None:
            self.mirror.push_metrics(now=True)
        print(f"resuming {self.name} at step {step}", file=stream, flush=True)


class Mirror:
    """A run folder at an object-store URL, trained in a local copy (a folder of its own in the temporary
    directory). Opening it copies down what a resume reads: the config, the metrics and each checkpoint's
    current set. Changes go up as they are made: a checkpoint set's files first and its pointer last, so an
    upload cut short never replaces ``last`` (:meth:`push_set`); the metrics at each checkpoint and at most
    every :data:`EVERY_S` seconds between; pictures and TensorBoard or W&B files with each checkpoint and when
    the run ends. A run killed between checkpoints resumes from the last uploaded one, as a local run does."""

    #: the most often the metrics of a running run are uploaded whole (an object store has no append)
    EVERY_S = 30.0

    def __init__(self, url: str, checkpoints: bool = True):
        from featcache.store.location import check_reachable, locate

        self.url = url.rstrip("/")
        check_reachable(self.url)
        self.remote = locate(self.url)
        self.local = Path(tempfile.mkdtemp(prefix="featcache-run-"))
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        self._metrics_at = 0.0
        try:
            self._pull(checkpoints)
        except BaseException:
            self.close()
            raise

    def _pull(self, checkpoints: bool) -> None:
        for name in (CONFIG, METRICS):
            self._get(name)
        if not checkpoints:
            return
        for found in self.remote.backend.glob(self.remote.join(CHECKPOINTS, "*", checkpoint.POINTER).path)[0]:
            folder = posix_relative(found, self.remote.path).rsplit("/", 1)[0]
            self._get(f"{folder}/{checkpoint.POINTER}")
            record = json.loads((self.local / folder / checkpoint.POINTER).read_text())
            for name in record.get("files", []):
                self._get(f"{folder}/{record['set']}/{name}")

    def _get(self, relative: str) -> None:
        source, target = self.remote.join(*relative.split("/")), self.local / relative
        if not source.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        source.download(target)
        st = target.stat()
        self._sent[relative] = (st.st_size, st.st_mtime_ns)

    def push(self, path: Path) -> None:
        """Upload one file of the local copy (whole: a reader sees the old object or the new one)."""
        relative = path.relative_to(self.local).as_posix()
        st = path.stat()
        self.remote.join(*relative.split("/")).upload(path)
        self._sent[relative] = (st.st_size, st.st_mtime_ns)

    def push_set(self, folder: Path) -> None:
        """A checkpoint folder's current set: its files, then its pointer; then the sets it replaced go."""
        record = json.loads((folder / checkpoint.POINTER).read_text())
        for name in record["files"]:
            self.push(folder / record["set"] / name)
        self.push(folder / checkpoint.POINTER)
        where = self.remote.join(*folder.relative_to(self.local).parts)
        for old in {posix_relative(p, where.path).split("/", 1)[0] for p in where.backend.find(where.path)}:
            if old.startswith("set-") and old != record["set"]:
                where.join(old).delete(recursive=True)

    def push_metrics(self, now: bool = False) -> None:
        """metrics.jsonl, when ``now`` or :data:`EVERY_S` after its last upload."""
        path = self.local / METRICS
        if path.exists() and (now or time.monotonic() - self._metrics_at >= self.EVERY_S):
            self.push(path)
            self._metrics_at = time.monotonic()

    def push_changes(self) -> None:
        """Every file of the local copy that changed since it was last uploaded, outside the checkpoints
        (:meth:`push_set` sends those): the metrics, pictures, TensorBoard and W&B files."""
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            relative = path.relative_to(self.local).as_posix()
            st = path.stat()
            if not relative.startswith(f"{CHECKPOINTS}/") and self._sent.get(relative) != (st.st_size, st.st_mtime_ns):
                self.push(path)

    def remove(self, names: tuple[str, ...]) -> None:
        """Remove these files and folders of the run on the store (a run started over)."""
        for name in names:
            self.remote.join(name).delete(recursive=True)
        self._sent = {k: v for k, v in self._sent.items() if k.split("/", 1)[0] not in names}

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


def posix_relative(path: str, top: str) -> str:
    """``path`` below ``top`` (both a backend's paths), without the leading slash."""
    return path[len(top.rstrip("/")):].lstrip("/")
