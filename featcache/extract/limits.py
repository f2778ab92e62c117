"""Sizes an extract job refuses before it makes any folder: shards and batches that cannot fit.

A worker holds a whole shard of each view in host memory (its stored dtype, then its encoded
objects), and zarr's per-shard objects (the dense shard index, the summary, box and valid chunks)
are allocated at the full shard size even when the cache has fewer images. So a shard of
``shard_size`` rows needs about ``shard_size`` x :func:`row_bytes` summed over the job's views. One
forward holds the activations of ``min(batch_size, shard_size)`` images (a batch never spans two
shards), estimated as :func:`featcache.extract.pools.footprint` does. Either above half the memory
of this machine (:data:`SHARE`: the rest is for the teachers, the decoded images of this shard and
the next, and Ray) is refused in one line that says the largest size that fits. The figures are
planning estimates: what passes may still be too large on a smaller worker node.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featcache.errors import UsageError
from featcache.extract.progress import plural
from featcache.store.spec import ViewSpec
from featcache.teachers import TeacherSpec

SHARE = 0.5  # of the machine's memory that one shard's buffers, or one batch's activations, may take
INDEX_BYTES = 16  # a sharded zarr array's index entry per inner chunk: offset and length, uint64 each


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's (cgroup v2/v1) limit
    when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def row_bytes(spec: ViewSpec) -> int:
    """Host bytes one image row of ``spec`` takes in a shard being written: dense and summary twice
    (the buffer, then the encoded object), the shard index entries of its tiles, box and valid."""
    summary = spec.summary_channels * np.dtype(spec.codec_type.summary_dtype).itemsize
    dense = spec.grid[0] * spec.grid[1] * spec.codec_type.token_bytes(spec.channels)
    tiles = spec.tiles[0] * spec.tiles[1]
    return 2 * (dense + summary) + INDEX_BYTES * tiles + 4 * 4 + 1


def check_shard_size(shard_size: int, views: list[ViewSpec], memory: int) -> None:
    """Refuse a shard whose buffers for ``views`` exceed :data:`SHARE` of ``memory``."""
    per_row = sum(row_bytes(v) for v in views)
    budget = int(SHARE * memory)
    if shard_size * per_row > budget:
        raise UsageError(f"shard_size {shard_size} needs {_gib(shard_size * per_row)} of buffers per shard for "
                         f"{', '.join(v.key for v in views)}, more than half of this machine's {_gib(memory)} "
                         f"of memory: give a shard size of at most {max(1, budget // per_row)}")


def check_batch_size(batch_size: int, shard_size: int, teacher: TeacherSpec, tokens: int, memory: int) -> None:
    """Refuse a batch whose forward through ``teacher`` at ``tokens`` tokens (its largest input) would
    hold activations above :data:`SHARE` of ``memory``."""
    from featcache.extract.pools import ACTIVATION_FACTOR

    per_image = tokens * teacher.channels * ACTIVATION_FACTOR
    batch = min(batch_size, shard_size)
    budget = int(SHARE * memory)
    if batch * per_image > budget:
        raise UsageError(f"batch_size {batch_size} needs ~{_gib(batch * per_image)} of activations per forward of "
                         f"{teacher.name} ({tokens} tokens of {teacher.channels} channels), more than half of this "
                         f"machine's {_gib(memory)} of memory: give a batch size of at most "
                         f"{max(1, budget // per_image)}")


def check_sizes(shard_size: int, batch_size: int, teachers: list[TeacherSpec], views: list,
                memory: int | None = None) -> None:
    """Refuse a job whose shards or batches cannot fit this machine; ``views``: (ViewTask, ViewSpec)
    pairs, as ``plan.view_specs`` gives them."""
    memory = memory or machine_memory()
    check_shard_size(shard_size, [spec for _, spec in views], memory)
    for i, teacher in enumerate(teachers):
        tasks = [task for task, _ in views if task.teacher == i]
        check_batch_size(batch_size, shard_size, teacher, forward_tokens(teacher, tasks), memory)


def forward_tokens(teacher: TeacherSpec, tasks: list) -> int:
    """The tokens of one input of ``teacher``'s largest forward among its view ``tasks`` (each view's
    kind says its input: a mosaic's and an upsampled view's are the teacher's native size)."""
    return max(task.kind.forward(teacher, 1).tokens(teacher) for task in tasks)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def placeable(nodes: list[dict], need: dict[str, float]) -> int:
    """How many actors that each need ``need`` (Ray resource -> amount, e.g. {"CPU": 2, "GPU": 0.5})
    fit at once on ``nodes`` (each alive node's total resources, as ``ray.nodes()`` lists them)."""
    total = 0
    for resources in nodes:
        fits = [int((resources.get(name, 0) + 1e-6) // amount) for name, amount in need.items() if amount > 0]
        total += min(fits) if fits else 0
    return total


def check_placement(workers: int, need: dict[str, float], nodes: list[dict]) -> None:
    """Refuse ``workers`` actors of ``need`` each that the cluster's ``nodes`` cannot hold at once:
    Ray would wait for them forever (no autoscaler adds a node here)."""
    fits = placeable(nodes, need)
    if workers > fits:
        each = ", ".join(f"{amount:g} {name}" for name, amount in need.items() if amount > 0)
        have = ", ".join(f"{sum(n.get(name, 0) for n in nodes):g} {name}" for name in need if need[name] > 0)
        raise UsageError(f"the Ray cluster cannot place {plural(workers, 'worker')} of {each} each: its "
                         f"{plural(len(nodes), 'node')} ({have} in all) can hold {fits}; give fewer "
                         "--cpu-workers or --threads-per-worker (or --workers-per-gpu), or join a larger cluster")
