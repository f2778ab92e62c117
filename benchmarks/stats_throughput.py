"""Throughput of ``featcache stats`` on this machine: tokens/s of the moments pass for C = 1024 and
C = 4096, and the time of the PHI-S fit (float64 eigh + Hadamard) for C = 4096.

    python benchmarks/stats_throughput.py [--tokens 65536]

A synthetic float16 cache (the stored dtype of real views) of ``--tokens`` patch tokens per C is
written to a temporary directory; the pass is the per-group function the Ray tasks run
(``featcache.stats.compute.partial``: read the shard, float64 centred scatter, merge), timed in this
process on all cores, so the figure is per machine, not per Ray worker. The ratio printed is the
moments pass at C = 4096 against a bare float64 ``X.T @ X`` on the same tokens, in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from featcache.stats import PhiS
from featcache.stats.compute import groups, partial
from tests.support.caches import make_cache


def build(root: str, channels: int, tokens: int):
    grid = (16, 16)
    n = tokens // (grid[0] * grid[1])
    cache, view = make_cache(root, n=n, shard_size=16, grid=grid, channels=channels, dtype="float16")
    rng = np.random.default_rng(0)
    for k in range(view.num_shards):
        start, stop = view.shard_range(k)
        m = stop - start
        view.write_shard(start, rng.standard_normal((m, *grid, channels)).astype(np.float16),
                         rng.standard_normal((m, 5)).astype(np.float16), np.zeros((m, 4), np.float32))
    return view


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    print(f"{args.tokens} float16 tokens per view, grid 16x16, shards of 16 images")
    with tempfile.TemporaryDirectory() as tmp:
        for c in (1024, 4096):
            view = build(f"{tmp}/c{c}", c, args.tokens)
            shards = sorted(view.committed_shards())
            t0 = time.perf_counter()
            merged = None
            for g in groups(shards):
                p = partial(view, g, 1.0, 0)
                merged = p if merged is None else merged.merge(p)
            seconds = time.perf_counter() - t0
            line = f"  C={c:5d}: moments pass {merged.dense.count / seconds:10.0f} tokens/s ({seconds:.2f} s)"
            if c == 4096:
                x = view.group["dense"][:].reshape(-1, c).astype(np.float64)
                t0 = time.perf_counter()
                x.T @ x
                bare = time.perf_counter() - t0
                line += f"; bare X.T@X {x.shape[0] / bare:10.0f} tokens/s: ratio {bare / seconds:.2f}"
                t0 = time.perf_counter()
                PhiS.fit(merged.dense)
                line += f"\n  C=4096: PHI-S fit (eigh float64 + Hadamard) {time.perf_counter() - t0:.1f} s"
            print(line)


if __name__ == "__main__":
    main()
