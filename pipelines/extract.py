"""``featcache extract`` as a Ray job: the library's extract job, its workers as Ray actors.

    featcache extract job.yaml                       # embedded local Ray, sized to this machine
    featcache extract job.yaml --ray-address auto    # join a running cluster

The job itself (plan, scheduler, back-off, stop policy, progress, teacher pools, run record) is
library code, ``featcache.extract.job`` and ``featcache.extract.scheduler``; here is only what Ray
adds: an actor per worker (a ``WorkerHost`` in its own process, teachers loaded once, answering
``progress()`` while ``process()`` runs), and :class:`RayExecutor`, which spawns, calls, waits on
and kills those actors for the scheduler and tells a dead actor (``WorkerLost``) from an exception
raised inside a call (``TaskFailed``). Only shard numbers and small records cross the Ray object
store, never images or features.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket

from featcache.extract.config import ExtractConfig
from featcache.extract.executor import Cluster, TaskFailed, WorkerHost, WorkerLost
from featcache.extract.job import ExtractResult, Runtime
from featcache.extract.job import run as run_job
from featcache.log import LogStream
from featcache.pipelines.ray_session import ray_session, resolve_address

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the process title in a task error's text


def run(config: ExtractConfig, stream=None) -> ExtractResult:
    """Run (or resume) the extract job ``config`` on Ray; see :func:`featcache.extract.job.run`."""
    stream = stream or LogStream()

    @contextlib.contextmanager
    def connect():
        with ray_session(config.ray_address, stream):
            yield RayExecutor()

    runtime = Runtime(connect, _stats, resolve_address(config.ray_address)[0])
    return run_job(config, runtime, stream)


def _stats(config: ExtractConfig, keys: list[str], stream) -> list:
    """PHI-S and dispersion of the job's fully committed views (frozen ones are kept unless ``recompute_stats``)."""
    from featcache.pipelines import stats

    rows = stats.run(config.output, keys, seed=config.seed, recompute=config.recompute_stats,
                     ray_address=config.ray_address, complete_only=True)
    print(stats.table(rows), file=stream, flush=True)
    return rows


@functools.cache
def _actor_class():
    """The worker actor (defined on first use: importing this module does not import Ray)."""
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)  # progress() answers while process() runs
    class ExtractActor(WorkerHost):
        """One worker: a WorkerHost in its own process, with this many torch threads, named by its node."""

        def __init__(self, kwargs: dict, threads: int):
            import torch

            torch.set_num_threads(threads)
            ctx = ray.get_runtime_context()
            info = {"node": ctx.get_node_id(), "host": socket.gethostname()}
            os.environ["FEATCACHE_NODE_ID"] = info["node"]
            super().__init__(kwargs, info, threads)

    return ExtractActor


class RayExecutor:
    """The scheduler's executor on the Ray runtime this process is connected to."""

    def __init__(self):
        import ray

        self.ray = ray

    def cluster(self) -> Cluster:
        alive = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        return Cluster(dict(self.ray.cluster_resources()), alive)

    def gpu_memory(self) -> int:
        """Bytes of memory of one of the cluster's GPUs (a task on it asks torch)."""

        @self.ray.remote(num_gpus=1)
        def total_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        return self.ray.get(total_memory.remote())

    def spawn(self, kwargs: dict, threads: int, need: dict[str, float]):
        options = {"num_cpus": need["CPU"], **({"num_gpus": need["GPU"]} if need.get("GPU") else {})}
        return _actor_class().options(**options).remote(kwargs, threads)

    def call(self, actor, method: str, *args):
        return getattr(actor, method).remote(*args)

    def first(self, refs: list, timeout: float) -> list:
        return self.ray.wait(refs, num_returns=1, timeout=timeout)[0]

    def finished(self, refs: list) -> list:
        return self.ray.wait(refs, num_returns=len(refs), timeout=0)[0]

    def result(self, ref):
        """The call's value; a dead actor (killed, out of memory, node lost) raises WorkerLost, an
        exception inside the call TaskFailed with the exception Ray kept and its remote traceback."""
        errors = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except errors.RayTaskError as e:
            raise TaskFailed(_cause(e) or e, _ANSI.sub("", str(e))) from e
        except _deaths(errors) as e:  # the actor died (its slot is free again), or its node
            raise WorkerLost(e, _summary(e, isinstance(e, errors.OutOfMemoryError))) from e
        except errors.RayError as e:  # the actor lives (a lost result, a timeout): the call failed
            raise TaskFailed(e, _ANSI.sub("", str(e))) from e

    def kill(self, actor) -> None:
        self.ray.kill(actor)


def _deaths(errors) -> tuple[type, ...]:
    """Ray's errors that mean the actor is gone: killed, out of memory, its process or node lost."""
    return (errors.RayActorError, errors.OutOfMemoryError, errors.WorkerCrashedError, errors.NodeDiedError,
            errors.LocalRayletDiedError)


def _summary(e: BaseException, out_of_memory: bool) -> str:
    """One line of a dead actor's error: Ray's last line, or its first for its memory monitor's kill."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if out_of_memory:
        lines = lines[:1]
    return lines[-1] if lines else type(e).__name__


def _cause(e: BaseException) -> BaseException | None:
    """The exception raised inside the actor, when Ray kept it."""
    for name in ("cause", "cause_cls"):
        value = getattr(e, name, None)
        if isinstance(value, BaseException):
            return value
    return None
