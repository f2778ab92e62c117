"""What the extract scheduler needs of the machinery that runs its workers (Ray, or threads here).

An :class:`Executor` reports the cluster's resources, spawns a worker (a :class:`WorkerHost`, which
wraps a ``ShardWorker``) with a share of them, runs calls on it that return futures (``ready``,
``process``, ``calibrate``, ``progress``), tells which futures have finished, and kills a worker.
A call's result is its return value, or one of two exceptions that the scheduler treats apart:
:class:`WorkerLost` (the worker died: killed, out of memory, node lost; its shard may succeed on
another) and :class:`TaskFailed` (an exception raised inside the call; its ``cause`` is that
exception). ``pipelines/extract.py`` drives Ray actors through this interface; :class:`ThreadExecutor`
runs the same worker code in this process, one thread per call, for tests and for a job without Ray.
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
from concurrent import futures as cf
from dataclasses import dataclass, field
from typing import Any, Protocol

from featcache.errors import FeatcacheError


class WorkerLost(Exception):
    """The worker died while it held the call (``cause``: what the executor saw; ``summary``: one line)."""

    def __init__(self, cause: BaseException, summary: str = ""):
        super().__init__(str(cause))
        self.cause, self.summary = cause, summary or str(cause)


class TaskFailed(Exception):
    """The call raised ``cause`` inside the worker; ``trace``: its traceback as text."""

    def __init__(self, cause: BaseException, trace: str):
        super().__init__(str(cause))
        self.cause, self.trace = cause, trace


@dataclass(frozen=True)
class Cluster:
    """The resources workers may take: the totals (``{"CPU": 16, "GPU": 2}``) and each alive node's."""

    totals: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)


class Executor(Protocol):
    """Runs workers for the scheduler (see the module docstring)."""

    def cluster(self) -> Cluster: ...

    def gpu_memory(self) -> int:
        """Bytes of memory of one of the cluster's GPUs."""

    def spawn(self, kwargs: dict, threads: int, need: dict[str, float]) -> Any:
        """Start a worker host of ``kwargs`` (ShardWorker's) with ``threads`` torch threads, reserving
        ``need`` (resource -> amount); returns its handle at once (it loads its teachers meanwhile)."""

    def call(self, worker: Any, method: str, *args) -> Any:
        """A future of ``worker``'s ``method(*args)``; ``progress`` answers while ``process`` runs."""

    def first(self, futures: list, timeout: float) -> list:
        """The first of ``futures`` to finish, as a list of one; empty after ``timeout`` seconds."""

    def finished(self, futures: list) -> list:
        """Those of ``futures`` that have finished now (no wait)."""

    def result(self, future: Any) -> Any:
        """The future's value; raises WorkerLost or TaskFailed."""

    def kill(self, worker: Any) -> None:
        """Stop ``worker`` now (the next pool needs its memory); its pending futures become WorkerLost."""


class WorkerHost:
    """One worker as an executor holds it: a ShardWorker, its teachers loaded once, and who it is.

    A worker that cannot start for a user's reason (weights that do not load) keeps the error and
    says it through :meth:`ready`, so that the scheduler stops the job with that one line."""

    def __init__(self, kwargs: dict, info: dict, threads: int):
        from featcache.extract.worker import ShardWorker

        self.identity = {**info, "pid": os.getpid(), "threads": threads}
        self.worker = None
        try:
            self.worker = ShardWorker(**kwargs, info=info)
        except FeatcacheError as e:
            self.identity["error"] = str(e)
        else:
            self.identity["device"] = str(self.worker.device)

    def ready(self) -> dict:
        return self.identity

    def process(self, shard: int, views: list[str], prefetch: int | None) -> dict:
        if self.worker is None:
            raise FeatcacheError(self.identity["error"])
        return self.worker.process(shard, views, prefetch)

    def calibrate(self, key: str, rows: list[int], seed: int) -> dict:
        return self.worker.calibrate(key, rows, seed)

    def progress(self) -> dict:
        return self.worker.progress() if self.worker is not None else {"shard": None, "images": 0}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


class ThreadExecutor:
    """Workers in this process: each call on a thread of its own, so that ``progress`` answers while
    ``process`` runs, as on a Ray actor. ``resources``: what the one node offers (CPU, GPU)."""

    def __init__(self, resources: dict[str, float] | None = None):
        self.resources = dict(resources or {"CPU": 1})
        self._lost: dict[int, set] = {}  # id(host) -> its futures not finished when it was killed
        self._pool = cf.ThreadPoolExecutor(16, thread_name_prefix="featcache-worker-call")

    def cluster(self) -> Cluster:
        return Cluster(dict(self.resources), [dict(self.resources)])

    def gpu_memory(self) -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    def spawn(self, kwargs: dict, threads: int, need: dict[str, float]) -> "_Thread":
        info = {"node": "local", "host": socket.gethostname()}
        return _Thread(self._pool.submit(WorkerHost, kwargs, info, threads))

    def call(self, worker: "_Thread", method: str, *args) -> cf.Future:
        future = self._pool.submit(lambda: getattr(worker.host.result(), method)(*args))
        worker.futures.add(future)
        return future

    def first(self, futures: list, timeout: float) -> list:
        done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return [f for f in futures if f in done][:1]

    def finished(self, futures: list) -> list:
        return [f for f in futures if f.done()]

    def result(self, future: cf.Future) -> Any:
        if any(future in lost for lost in self._lost.values()):
            raise WorkerLost(RuntimeError("the worker was killed"), "the worker was killed")
        error = future.exception()
        if error is None:
            return future.result()
        if isinstance(error, WorkerLost):  # a host that died in a test
            raise error
        raise TaskFailed(error, "".join(traceback.format_exception(error)))

    def kill(self, worker: "_Thread") -> None:
        self._lost[id(worker)] = {f for f in worker.futures if not f.done()}
        threading.Thread(target=_close, args=(worker,), daemon=True).start()


@dataclass(eq=False)
class _Thread:
    """A worker host being built on a thread, and the calls made on it."""

    host: cf.Future
    futures: set = field(default_factory=set)


def _close(worker: _Thread) -> None:
    """Let a killed host's threads end once it is built (a thread cannot be stopped from outside)."""
    if worker.host.exception() is None:  # a host that never started has nothing to close
        worker.host.result().close()
