"""Which teachers share a worker: one pool of actors for all of them, or several pools run in turn.

A worker loads every teacher of its pool once and computes their views of each shard from one
decode. When the teachers do not fit one GPU together (a 7B model beside others, or several workers
per GPU), they are split into pools, run teacher-major: the whole job for the first pool's views,
its actors released, then the next pool (each image is decoded once per pool). The config says
``teacher_pools``: ``auto`` (the default: one pool when the estimates fit the GPU's memory, else
first-fit by size), ``shared`` (one pool), ``separate`` (one teacher each), or a list of lists of
teacher names.

The estimate per teacher is its weights in the dtype they load in on the device (bfloat16 on CUDA)
plus the activations of a batch at its largest view, plus a fixed allowance for the CUDA context and
the allocator's slack. It is a planning figure, not a guarantee: a pool that still runs out of
memory halves its batch (``Teacher.extract``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featcache.errors import UsageError

POOL_MODES = ("auto", "shared", "separate")
CONTEXT_BYTES = 1 << 30  # the CUDA context, cuBLAS workspaces and the allocator's slack, per worker
ACTIVATION_FACTOR = 24  # bytes per token and channel live at once in a bf16 forward (attention, MLP, norms)
FIT = 0.9  # the share of a worker's GPU memory the estimates may fill


@dataclass(frozen=True)
class Footprint:
    """A teacher's memory estimate on one worker."""

    name: str
    weights: int  # bytes
    activations: int  # bytes, one batch at the teacher's largest view

    @property
    def total(self) -> int:
        return self.weights + self.activations


def footprint(name: str, parameters: int, dtype: torch.dtype, batch: int, tokens: int, channels: int) -> Footprint:
    """The estimate for a teacher of ``parameters`` weights of ``dtype`` running ``batch`` images of
    ``tokens`` tokens (its largest view) of width ``channels``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Footprint(name, parameters * itemsize, batch * tokens * channels * ACTIVATION_FACTOR)


def choose(setting, names: list[str], footprints: list[Footprint] | None, memory: int | None) -> list[list[int]]:
    """The pools, as lists of teacher positions in config order.

    ``setting``: a mode of :data:`POOL_MODES` or a list of lists of teacher ``names``;
    ``footprints`` and ``memory`` (bytes a worker may use; None off CUDA) decide ``auto``."""
    everyone = list(range(len(names)))
    if not isinstance(setting, str):
        position = {n: i for i, n in enumerate(names)}
        return [[position[n] for n in pool] for pool in check_named(setting, names)]
    if setting == "shared" or len(names) <= 1:
        return [everyone]
    if setting == "separate":
        return [[i] for i in everyone]
    if setting != "auto":
        raise UsageError(f"teacher_pools {setting!r} is not one of {', '.join(POOL_MODES)}, nor a list of lists "
                         "of teacher names")
    if memory is None or footprints is None:
        return [everyone]
    budget = FIT * memory - CONTEXT_BYTES
    if sum(f.total for f in footprints) <= budget:
        return [everyone]
    pools: list[list[int]] = []
    room: list[int] = []
    for i in sorted(everyone, key=lambda i: -footprints[i].total):  # first fit, largest first
        fits = [p for p in range(len(pools)) if footprints[i].total <= room[p]]
        if fits:
            pools[fits[0]].append(i)
            room[fits[0]] -= footprints[i].total
        else:
            pools.append([i])
            room.append(budget - footprints[i].total)
    return sorted((sorted(p) for p in pools), key=lambda p: p[0])


def check_named(setting, names: list[str]) -> list[list[str]]:
    """``setting`` if it puts each of ``names`` in exactly one non-empty pool; else a UsageError."""
    if not isinstance(setting, (list, tuple)) or not all(isinstance(p, (list, tuple)) and p for p in setting):
        raise UsageError(f"teacher_pools must be one of {', '.join(POOL_MODES)} or a list of non-empty lists of "
                         f"teacher names, not {setting!r}")
    seen: list[str] = []
    for pool in setting:
        for name in pool:
            if name not in names:
                raise UsageError(f"teacher_pools names {name!r}, which is not a teacher of this job "
                                 f"(teachers: {', '.join(names)})")
            if name in seen:
                raise UsageError(f"teacher_pools names {name!r} twice: each teacher belongs to one pool")
            seen.append(name)
    missing = [n for n in names if n not in seen]
    if missing:
        raise UsageError(f"teacher_pools leaves out {missing[0]!r}: put every teacher in one pool")
    return [list(pool) for pool in setting]


def describe(pools: list[list[int]], names: list[str], footprints: list[Footprint] | None, memory: int | None) -> str:
    """One line: how the teachers are pooled, with the estimates that decided it when there are any."""
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    parts = []
    for pool in pools:
        text = " + ".join(names[i] for i in pool)
        if footprints is not None:
            text += f" (~{gib(sum(footprints[i].total for i in pool))})"
        parts.append(text)
    where = f" on workers of {gib(memory)}" if memory is not None else ""
    if len(pools) == 1:
        return f"teachers share each worker: {parts[0]}{where}"
    return f"{len(pools)} teacher pools, run in turn{where}: " + "; ".join(parts)
