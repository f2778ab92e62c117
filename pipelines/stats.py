"""``featcache stats`` as a Ray job: PHI-S and angular dispersion of every view, from the cache.

    featcache stats ROOT [--views K ...] [--token-budget N] [--seed S] [--recompute]

Each Ray task reduces a fixed group of shards to a partial result (float64 moments of the sampled
patch tokens, the summary vectors' sum; then, in a second pass, the summed squared angles); the
driver merges the partials in group order, fits PHI-S (eigh in float64) and writes ``stats/`` and
the attrs summary of each view. Frozen statistics are kept unless ``recompute``; those of an
int8-phis view come from its calibration (``extract`` fits them before writing) and are always kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from featcache.errors import UsageError
from featcache.store.location import check_reachable
from featcache.retry import storage_errors
from featcache.stats import compute
from featcache.store.cache import Cache
from featcache.pipelines.ray_session import ray_session


@dataclass(frozen=True)
class StatsRow:
    key: str
    channels: int
    tokens: int | None
    alpha: float | None
    dispersion: float | None
    note: str = ""


def run(root: str, views: list[str] | None = None, token_budget: int | None = None, seed: int = 0,
        recompute: bool = False, ray_address: str | None = None, complete_only: bool = False) -> list[StatsRow]:
    """Compute the statistics of ``views`` (all by default) of the cache at ``root``.

    Statistics of a view whose shards are all committed are frozen: kept by later runs unless
    ``recompute`` (reporting them reads neither the commits nor the manifest). Those of a partly
    committed view are written but not frozen; ``complete_only`` (what ``extract`` asks) leaves such
    views alone instead. Storage that refuses the statistics'
    writes (full, read-only) raises a StorageError naming the view.
    """
    if token_budget is not None and token_budget < 1:
        raise UsageError(f"token budget must be >= 1, not {token_budget}")
    compute.check_seed(seed)  # before anything is read or Ray starts (issue 23: stats --seed -1)
    check_reachable(root)  # one line for an unreachable endpoint, refused credentials, a missing bucket
    cache = Cache.open(root)
    keys = views or list(cache.views)
    unknown = [k for k in keys if k not in cache.views]
    if unknown:
        raise UsageError(f"no view {unknown[0]!r} in {cache.root.uri}; views: {', '.join(cache.views) or 'none'}")
    rows, todo = [], []
    length = cache.attrs().get("num_images")  # not the manifest: reporting kept statistics stays cheap
    for key in keys:  # kept statistics are reported without listing the view's commits
        view = cache.view(key)
        if view.spec.codec_type.needs_calibration:  # its codes are stored in the PHI-S space of these statistics
            rows.append(_calibrated(view))
        elif view.stats and view.stats.get("frozen") and not recompute:
            s = view.stats
            rows.append(StatsRow(key, view.spec.channels, s["tokens"], s["alpha"], s["dispersion"],
                                 _frozen_note(s, length)))
        elif not (committed := len(view.committed_shards())) or (complete_only and committed < view.num_shards):
            rows.append(StatsRow(key, view.spec.channels, None, None, None,
                                 f"not computed: {committed} of {view.num_shards} shards committed"))
        else:
            todo.append(key)
    if todo:
        cache.check_manifest()  # before Ray starts: a manifest edited since extraction is refused at once
        with ray_session(ray_address):
            done = {key: _compute(cache.view(key), token_budget, seed) for key in todo}
        rows = [done.get(r.key, r) for r in rows] + [done[k] for k in todo]
        cache.consolidate()  # the new statistics' arrays and attrs, for xarray
    order = {k: i for i, k in enumerate(keys)}
    return sorted(rows, key=lambda r: order[r.key])


def _frozen_note(stats: dict, length: int | None) -> str:
    """The note of kept statistics; it says when they were fitted before the cache grew to ``length`` rows."""
    fitted = stats.get("rows")
    if fitted is not None and length is not None and fitted < length:
        return f"frozen: fitted on the first {fitted} of now {length} images (--recompute to refit)"
    return "frozen (--recompute to overwrite)"


def _calibrated(view) -> StatsRow:
    s = view.stats
    if not s:
        return StatsRow(view.key, view.spec.channels, None, None, None,
                        "not computed: an int8-phis view's statistics come from extract's calibration")
    return StatsRow(view.key, view.spec.channels, s["tokens"], s["alpha"], s["dispersion"],
                    f"int8-phis calibration on {s.get('images')} images (frozen: its codes depend on it)")


def _compute(view, token_budget: int | None, seed: int) -> StatsRow:
    with storage_errors(f"writing the statistics of {view.key} to {view.loc.uri}"):
        s = compute.compute_view(view, seed=seed, token_budget=token_budget, run=_ray_map)
    if s is None:
        return StatsRow(view.key, view.spec.channels, 0, None, None, "no valid rows")
    note = s.hadamard if s.complete else f"{s.hadamard}; {s.shards} of {view.num_shards} shards (not frozen)"
    return StatsRow(view.key, s.channels, s.tokens, s.alpha, s.dispersion, note)


@functools.cache
def _task(fn):
    """``fn`` as a Ray task (defined on first use: importing this module does not import Ray)."""
    import ray

    return ray.remote(num_cpus=1)(fn)


def _ray_map(fn, calls: list[tuple]) -> list:
    """One Ray task per call, results in call order."""
    import ray

    task = _task(fn)
    return ray.get([task.remote(*args) for args in calls])


def json_rows(root: str, rows: list[StatsRow]) -> list[dict]:
    """The rows for ``stats --json`` (DESIGN.md §7): key, channels, tokens, alpha, dispersion, and the
    Hadamard construction the view's statistics used (from its attrs; None without statistics)."""
    cache = Cache.open(root)
    out = []
    for r in rows:
        attrs = cache.view(r.key).stats or {}
        out.append({"key": r.key, "channels": r.channels, "tokens": r.tokens, "alpha": r.alpha,
                    "dispersion": r.dispersion, "hadamard": attrs.get("hadamard"), "note": r.note})
    return out


def table(rows: list[StatsRow]) -> str:
    """The rows in the shape of Table 3 of the C-RADIOv4 report."""
    lines = [f"{'view':28s} {'channels':>8s} {'tokens':>10s} {'alpha':>9s} {'summary dispersion':>19s}  note"]
    for r in rows:
        tokens = "-" if r.tokens is None else f"{r.tokens:d}"
        alpha = "-" if r.alpha is None else f"{r.alpha:.4g}"
        disp = "-" if r.dispersion is None else f"{r.dispersion:.3f}"
        lines.append(f"{r.key:28s} {r.channels:>8d} {tokens:>10s} {alpha:>9s} {disp:>19s}  {r.note}")
    return "\n".join(lines)
