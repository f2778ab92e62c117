"""Driver side of the ``int8-phis`` calibration: which views need it, on which images, and storing
what a worker fitted (``ShardWorker.calibrate``) before any shard of the view is written."""

from __future__ import annotations

import numpy as np

from featcache.stats.compute import store
from featcache.store.statsio import view_attrs


def todo(plan) -> tuple[list[str], list[int]]:
    """The views of ``plan`` whose codec needs a calibration (int8-phis) they do not have yet, and the
    image rows to calibrate them on. A view calibrated earlier is checked first: codes whose
    statistics no longer match the recorded hash stop the job here, with one line, instead of
    failing every shard."""
    keys = []
    for task in plan.views:
        view = plan.cache.view(task.key)
        codec = view.spec.codec_type
        if not codec.needs_calibration:
            continue
        if codec.from_attrs(view.attrs).calibrated:
            codec.open(view)  # reads its statistics, checked against the hash its codes were written with
        else:
            keys.append(task.key)
    return keys, sample_rows(plan.cache.num_images, plan.config.calibration_images, plan.config.seed)


def sample_rows(num_images: int, count: int, seed: int) -> list[int]:
    """A seeded uniform sample of ``count`` image rows (all rows when there are fewer), in order."""
    if count >= num_images:
        return list(range(num_images))
    rng = np.random.default_rng([seed, 0])
    return sorted(int(i) for i in rng.choice(num_images, count, replace=False))


def store_calibration(view, result: dict) -> tuple[str, bool]:
    """Write a worker's calibration (stats arrays, summary, scale) into ``view`` unless one is there
    already (another job got there first: its codes may be written, so it stays). Returns the
    view's stats hash and whether this result was stored."""
    existing = view.spec.codec_type.from_attrs(view_attrs(view))
    if existing.calibrated:
        return existing.commit_info()["stats_hash"], False
    return store(view, result["arrays"], result["summary"], result["quantization"]), True


def calibrate_locally(plan, worker) -> list[str]:
    """Calibrate every pending view of ``plan`` with a plain ``ShardWorker`` (no Ray)."""
    keys, rows = todo(plan)
    for key in keys:
        store_calibration(plan.cache.view(key), worker.calibrate(key, rows, plan.config.seed))
    return keys
