"""PHI-S and angular-dispersion statistics of a cached view, computed from its committed shards.

The work splits into shard groups of fixed size (``GROUP``), each reduced to a partial result by a
plain function (a Ray task in ``pipelines/stats.py``, or a loop here); partials are merged in group
order, so the result does not depend on how many workers ran or in which order they finished:
the same cache and seed give the same bytes.

Dense statistics use patch tokens only (the cache never stores CLS or registers) of valid rows,
all of them or a seeded uniform subsample when a token budget is given (each token kept with
probability budget / total, decided by a generator seeded with (seed, shard)). Summary dispersion
uses every valid summary vector, in two passes (mean direction, then angles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.stats.dispersion import angles
from featcache.stats.moments import Moments
from featcache.stats.phis import PhiS
from featcache.store import attrs as attrs_json
from featcache.errors import CacheFormatError, UsageError
from featcache.store.cache import Cache
from featcache.store.codec import QUANTIZATION
from featcache.store.statsio import STATS, read_stats_at, stats_digest, stats_path
from featcache.store.zarrio import open_root, writes_settled_on_error

GROUP = 8  # shards per partial result


@dataclass
class Partial:
    """One group's contribution: dense moments and the summary vectors' sum."""

    dense: Moments
    summary_sum: np.ndarray
    summary_count: int

    def merge(self, other: "Partial") -> "Partial":
        self.dense.merge(other.dense)
        self.summary_sum = self.summary_sum + other.summary_sum
        self.summary_count += other.summary_count
        return self

    def to_dict(self) -> dict:
        return {**self.dense.to_arrays(), "summary_sum": self.summary_sum, "summary_count": self.summary_count}

    @classmethod
    def from_dict(cls, d: dict) -> "Partial":
        return cls(Moments.from_arrays(d), np.asarray(d["summary_sum"]), int(d["summary_count"]))


def check_seed(seed: int) -> int:
    """``seed``, refused in one line unless it is a non-negative integer (numpy's seeding takes no other)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be >= 0, not {seed}")
    return seed


def groups(shards: list[int]) -> list[list[int]]:
    shards = sorted(shards)
    return [shards[i:i + GROUP] for i in range(0, len(shards), GROUP)]


def _rows(view, shard: int) -> tuple[int, int, np.ndarray]:
    start, stop = view.shard_range(shard)
    return start, stop, view.group["valid"][start:stop].astype(bool)


def partial(view, shards: list[int], fraction: float, seed: int) -> Partial:
    """Pass 1 over ``shards``: dense moments of the (sampled) valid tokens, summary sum."""
    spec = view.spec
    out = Partial(Moments.empty(spec.channels), np.zeros(spec.summary_channels), 0)
    for shard in shards:
        start, stop, valid = _rows(view, shard)
        if not valid.any():
            continue
        tokens = view.group["dense"][start:stop][valid].reshape(-1, spec.channels)
        if fraction < 1.0:
            tokens = tokens[np.random.default_rng([seed, shard]).random(len(tokens)) < fraction]
        out.dense.merge(Moments.of(tokens))
        summary = view.group["summary"][start:stop][valid].astype(np.float64)
        out.summary_sum = out.summary_sum + summary.sum(axis=0)
        out.summary_count += len(summary)
    return out


def angle_sums(view, shards: list[int], direction: np.ndarray) -> tuple[float, int]:
    """Pass 2 over ``shards``: Σ Θ(y, μ)² and the count."""
    total, count = 0.0, 0
    for shard in shards:
        start, stop, valid = _rows(view, shard)
        if valid.any():
            theta = angles(view.group["summary"][start:stop][valid], direction)
            total += float((theta ** 2).sum())
            count += len(theta)
    return total, count


def valid_tokens(view, shards: list[int]) -> int:
    valid = view.group["valid"][:]
    rows = sum(int(valid[slice(*view.shard_range(s))].sum()) for s in shards)
    return rows * view.spec.grid[0] * view.spec.grid[1]


def fraction_for(view, shards: list[int], token_budget: int | None) -> float:
    total = valid_tokens(view, shards)
    if not token_budget or token_budget >= total:
        return 1.0
    return token_budget / total


@dataclass(frozen=True)
class ViewStats:
    key: str
    channels: int
    tokens: int
    alpha: float
    dispersion: float | None
    hadamard: str
    complete: bool
    shards: int  # committed shards the statistics were computed from


def stats_arrays(phis: PhiS, moments: Moments, direction: np.ndarray | None, seed: int) -> dict[str, np.ndarray]:
    """The arrays ``stats/`` holds for a fitted PHI-S (R and R⁻¹ in float32, as ALGORITHMS.md §1 says)."""
    arrays = {"mean": phis.mean, "rotation": phis.rotation.astype(np.float32),
              "inverse": phis.inverse.astype(np.float32), "eigenvalues": phis.eigenvalues,
              "channel_mean": moments.mean, "channel_std": np.sqrt(np.diag(moments.covariance))}
    if direction is not None:
        arrays["summary_mean_direction"] = direction
    if not phis.hadamard.is_hadamard:  # a random fallback cannot be rebuilt from a name: keep it
        from featcache.stats.hadamard import hadamard

        arrays["hadamard"] = hadamard(len(phis.mean), seed)[0]
    return arrays


def stats_summary(phis: PhiS, moments: Moments, dispersion: float | None, summary_vectors: int, seed: int,
                  **extra) -> dict:
    """The attrs summary of a view's statistics (``extra``: how they were sampled, frozen, source)."""
    return {"alpha": phis.alpha, "dispersion": dispersion, "tokens": moments.count,
            "summary_vectors": summary_vectors, "seed": seed, "hadamard": phis.hadamard.to_dict(), **extra}


def store(view, arrays: dict[str, np.ndarray], summary: dict, quantization: dict | None = None) -> str:
    """Publish statistics into ``view`` atomically (driver only); returns the stats hash.

    The arrays go to a folder of their own (``stats/<hash>``), are read back and checked, and only
    then do the view's attrs switch to them (with ``quantization``, the int8-phis scale, in the same
    write, so codes never meet other statistics); older versions are removed last. A process killed
    at any step leaves the old statistics or the new ones, complete.
    """
    digest = stats_digest(arrays)
    path = stats_path(digest)
    view_group = open_root(view.cache.features, mode="a")[view.key]
    with writes_settled_on_error():
        if not _published(view, path, arrays, digest):
            _write_arrays(view_group, path, arrays)
            if not _published(view, path, arrays, digest):
                raise CacheFormatError(f"{view.key}: the statistics written under {path} read back differently")
        _switch_attrs(view_group, summary, digest, path, sorted(arrays), quantization)
    _remove_other_versions(view, path)
    return digest


def _published(view, path: str, arrays: dict, digest: str) -> bool:
    """True when ``path`` holds exactly ``arrays`` (a recompute with the same seed finds them there)."""
    try:
        return stats_digest(read_stats_at(view, path, sorted(arrays))) == digest
    except (FileNotFoundError, KeyError):
        return False


def _write_arrays(view_group, path: str, arrays: dict[str, np.ndarray]) -> None:
    group = view_group.create_group(path, overwrite=True)
    for name, value in arrays.items():
        _write_array(group, name, value)


#: xarray's dimension names of the statistics arrays. They share the view's own names and sizes
#: ("channel" = the dense channels, "summary_channel"), as a DataTree of the cache needs; the
#: Hadamard fallback is a C x C rotation like ``rotation``, so it is not named row/col (the grid's).
STATS_DIMENSIONS = {
    "mean": ("channel",), "channel_mean": ("channel",), "channel_std": ("channel",),
    "rotation": ("out_channel", "channel"), "inverse": ("channel", "out_channel"),  # y = x R^T, x = y R^-T
    "hadamard": ("out_channel", "channel"), "eigenvalues": ("component",),
    "summary_mean_direction": ("summary_channel",), "codec_basis": ("code_component", "channel"),
}


def _write_array(group, name: str, value: np.ndarray) -> None:
    """Write one statistics array, named by :data:`STATS_DIMENSIONS` (a new array fails loudly there)."""
    a = group.create_array(name, shape=value.shape, dtype=value.dtype, chunks=value.shape,
                           dimension_names=STATS_DIMENSIONS[name])
    a[...] = value


def _switch_attrs(view_group, summary: dict, digest: str, path: str, names: list[str],
                  quantization: dict | None) -> None:
    attrs = attrs_json.read(view_group.attrs)
    attrs["stats"] = {**summary, "hash": digest, "arrays": names, "path": path}
    if quantization is not None:
        attrs[QUANTIZATION] = {**quantization, "stats_hash": digest}
    attrs_json.write(view_group, attrs)


def _remove_other_versions(view, keep: str) -> None:
    """Everything in ``stats/`` but the published version (older versions, pre-versioning arrays)."""
    folder = view.loc.join(STATS)
    for entry in folder.backend.list(folder.path):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name != keep.rsplit("/", 1)[-1] and name != "zarr.json":
            folder.backend.delete(entry, recursive=True)


def write(view, merged: Partial, angle_total: float, angle_count: int, direction: np.ndarray | None,
          seed: int, token_budget: int | None, fraction: float, shards: int) -> ViewStats:
    """Fit PHI-S, write the ``stats/`` arrays and the attrs summary of ``view`` (driver only)."""
    phis = PhiS.fit(merged.dense, seed=seed)
    dispersion = angle_total / angle_count if angle_count else None
    complete = shards == view.num_shards
    summary = stats_summary(phis, merged.dense, dispersion, merged.summary_count, seed, token_budget=token_budget,
                            sample_fraction=fraction, frozen=complete, shards=[shards, view.num_shards],
                            source="cache", rows=view.num_images)  # rows: the cache's length (it may grow)
    store(view, stats_arrays(phis, merged.dense, direction, seed), summary)
    return ViewStats(view.key, view.spec.channels, merged.dense.count, phis.alpha, dispersion,
                     phis.hadamard.describe(), complete, shards)


def group_partial(root: str, key: str, shards: list[int], fraction: float, seed: int) -> dict:
    """Pass 1 of one shard group, from a cache root (what a worker task runs)."""
    return partial(Cache.open(root).view(key), shards, fraction, seed).to_dict()


def group_angles(root: str, key: str, shards: list[int], direction: np.ndarray) -> tuple[float, int]:
    """Pass 2 of one shard group, from a cache root (what a worker task runs)."""
    return angle_sums(Cache.open(root).view(key), shards, direction)


def _local_map(fn, calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


def compute_view(view, seed: int = 0, token_budget: int | None = None, run=_local_map) -> ViewStats | None:
    """Statistics of ``view`` from its committed shards, written into the view; None when no row is valid.

    ``run(fn, calls)`` returns ``[fn(*args) for args in calls]``: a loop in this process by default,
    Ray tasks in ``pipelines/stats.py``. Results are merged in group order whatever ``run`` does.
    """
    check_seed(seed)
    if view.spec.codec_type.needs_calibration:
        raise UsageError(f"{view.key} stores {view.spec.codec} codes fitted to its calibration statistics: "
                         "they cannot be recomputed (extract into a new view to change them)")
    view.cache.check_manifest()
    shards = sorted(view.committed_shards())
    fraction = fraction_for(view, shards, token_budget)
    root, key = view.cache.root.uri, view.key
    merged = None
    for d in run(group_partial, [(root, key, g, fraction, seed) for g in groups(shards)]):
        p = Partial.from_dict(d)
        merged = p if merged is None else merged.merge(p)
    if merged is None or merged.dense.count == 0:
        return None
    norm = np.linalg.norm(merged.summary_sum)
    direction = merged.summary_sum / norm if merged.summary_count and norm > 0 else None
    total, count = 0.0, 0
    if direction is not None:
        for t, c in run(group_angles, [(root, key, g, direction) for g in groups(shards)]):
            total, count = total + t, count + c
    return write(view, merged, total, count, direction, seed, token_budget, fraction, len(shards))
