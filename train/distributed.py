"""Data-parallel training on existing engines (DESIGN.md §5, "Training at scale").

``torchrun --nproc-per-node N -m featcache.cli train ...`` (or Slurm, a Kubernetes PyTorchJob: anything that sets
the standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` environment) and Ray Train's workers (which
start the process group themselves) train one student with ``DistributedDataParallel``: NCCL on GPUs, gloo on
the CPU. Nothing here launches processes; it reads where this one stands among them.

The global batch stays a function of (seed, step) (:class:`featcache.train.data.BatchPlan`): each rank takes
a contiguous share of it, and the student's own random draws (the CPE's crops, drop-path) are drawn for the whole
global batch on every rank, each keeping its share's rows (:attr:`featcache.train.student.Student.batch_share`),
so a step of N processes is a single process's step with the same batch, and a run resumes with any N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from featcache.errors import UsageError

#: how long a rank waits for the others at a collective (rank 0 evaluating or saving included)
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes: ``rank`` of ``world``, ``local`` on its node."""

    rank: int = 0
    world: int = 1
    local: int = 0
    owns_group: bool = False  # this module started the process group (Ray Train starts its own)

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (checkpoints, metrics, pictures, evaluations)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, batch: int) -> tuple[int, int]:
        """(first, stop) of this rank's contiguous share of a global batch of ``batch`` samples."""
        if batch % self.world:
            raise UsageError(f"optim.batch_size {batch} does not split over {self.world} processes: use a multiple "
                             f"of {self.world} (each process takes an equal share of every batch)")
        n = batch // self.world
        return self.rank * n, (self.rank + 1) * n

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over the ranks (every rank calls it with the same keys, in the same order)."""
        if not self.parallel or not values:
            return values
        return {k: v / self.world for k, v in zip(values, self.total(list(values.values())))}

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the ranks (a copy; no gradient flows through the sum)."""
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.parallel:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_device_of_group())
        dist.all_reduce(t)
        return t.tolist()


def _device_of_group() -> torch.device:
    """Where the group's collectives take tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched() -> bool:
    """Whether this process was started as one of several (torchrun's environment, or a group already up)."""
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> Ranks:
    """This process's :class:`Ranks`, joining the process group the environment describes (gloo for a CPU
    ``device``, NCCL for CUDA) unless one is up already (Ray Train starts its own). One process alone: rank 0
    of 1."""
    if not launched():
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise UsageError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {key} is not set: start the "
                                 "processes with torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device, local))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local, owns)


def local_device(device: torch.device, local: int) -> torch.device:
    """The device rank ``local`` of a node trains on: GPU ``local`` for CUDA (one process per GPU), else ``device``."""
    if device.type != "cuda":
        return device
    if local >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} CUDA device(s) on this "
                         "node: start at most one process per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local)


def leave(ranks: Ranks) -> None:
    """Close the process group :func:`join` started (one Ray Train started stays Ray Train's)."""
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()
