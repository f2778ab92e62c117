"""``featcache train --ray-address ADDR --ray-workers N``: the data-parallel training of
:mod:`featcache.train.loop` as a Ray Train job (DESIGN.md §5, "Training at scale").

Ray Train starts N workers on the cluster (one GPU each when the cluster has GPUs), joins them in a
``torch.distributed`` group (NCCL, or gloo on CPUs) and each runs :func:`featcache.train.loop.train` as a
torchrun process would: rank 0 writes the run folder, which every worker must reach (a shared disk, or the
same machine). Nothing is retried by Ray: a lost worker stops the job with one line, and ``--resume``
continues from the last checkpoint, with any number of workers.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from featcache.errors import FeatcacheError, UsageError
from featcache.log import LogStream
from featcache.pipelines.ray_session import ray_session
from featcache.retry import describe
from featcache.runs import is_url
from featcache.train import config as train_config
from featcache.train.config import TrainConfig
from featcache.train.loop import TrainResult, open_cache, planned, recorded


class TrainingStopped(FeatcacheError):
    """A Ray Train worker failed or was lost: the run stops at its last checkpoint; ``--resume`` continues."""

    exit_code = 1


def run(cfg: TrainConfig | None, out: str | Path, resume: bool = False, init: str | None = None,
        ray_address: str | None = None, workers: int = 1, stream=None) -> TrainResult:
    """Train (``resume``: continue) the run in ``out`` on ``workers`` Ray Train workers. The folder's rules,
    the config and the split of the batch over the workers are checked before Ray starts."""
    if workers < 1:
        raise UsageError(f"--ray-workers must be at least 1, not {workers}")
    cfg = planned(out, cfg, resume)
    out = out if is_url(out) else Path(out).absolute()  # a worker's directory is not this one
    if not resume:  # the workers' config names the cache as this process found it (``--resume``: the folder's)
        cfg = dataclasses.replace(cfg, cache=open_cache(cfg.cache).root.uri)
    if cfg.optim.batch_size % workers:
        raise UsageError(f"optim.batch_size {cfg.optim.batch_size} does not split over {workers} workers: use a "
                         f"multiple of {workers} (each worker takes an equal share of every batch)")
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    import ray

    stream, began = stream or LogStream(), time.perf_counter()
    storage = tempfile.mkdtemp(prefix="featcache-raytrain-")  # Ray Train's own run records; the run is in ``out``
    try:
        with ray_session(None if ray_address == "local" else ray_address, stream, log_to_driver=True):
            gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            job = TorchTrainer(
                _worker, train_loop_config={"config": None if resume else cfg.to_dict(), "out": str(out),
                                            "resume": resume, "init": init},
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
                torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                run_config=RunConfig(name=str(out).rstrip("/").rsplit("/", 1)[-1] or "run", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=0)))
            print(f"training on {workers} Ray Train worker(s){' with a GPU each' if gpu else ''}", file=stream,
                  flush=True)
            try:
                job.fit()
            except TrainingFailedError as e:
                raise TrainingStopped(f"a training worker failed ({_first_line(e)}); the run stopped at its last "
                                      f"checkpoint: continue with 'featcache train --out {out} --resume'") from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return recorded(out, time.perf_counter() - began)


def _first_line(error: BaseException) -> str:
    """The worker's own error (the root of the chain Ray wraps around it), in one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    return describe(error)


def _worker(settings: dict) -> None:
    """One Ray Train worker: :func:`featcache.train.loop.train` in the group Ray Train started."""
    from featcache.train.loop import train

    cfg = None if settings["config"] is None else train_config.from_dict(settings["config"])
    train(cfg, settings["out"], resume=settings["resume"], init=settings["init"])
