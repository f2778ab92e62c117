"""Training-style window reads of the same view stored as f16 and as int8-phis: samples/s and the ratio.

    python benchmarks/codec_reads.py [--images 256] [--rounds 5]

One cache holds two views of the same synthetic features, (28, 28, 1024) in 14x14 spatial tiles:
``f16@448`` (float16) and ``int8@448`` (int8-phis, calibrated on the first shard with the codec's
own calibration code). A pass is one epoch: every image once, in a random order, each with a 14x14
window at a random offset (one to four tiles), as a crop sampler would ask. Passes are timed:

- cold, stored values (``space="stored"``): the shard files are evicted from the page cache
  (``posix_fadvise(DONTNEED)``) before the pass, so every tile comes from the disk — the reader is
  bandwidth-bound and int8 moves half the bytes;
- cold, PHI-S floats (``space="phis"``): what a trainer computing its loss in PHI-S space gets
  (int8-phis: one table lookup per value; f16: (x − μ)Rᵀ on the host, a matrix product);
- hot, stored values: the files in the page cache (memory-bound).

Rounds interleave the codecs so machine noise hits both alike; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.pagecache import evict
from featcache.stats.calibrate import Calibration
from featcache.stats.compute import store
from featcache.store import Cache, ViewSpec
from featcache.store.codec import Int8Phis
from tests.support.caches import write_manifest

GRID, TILE, C, RANK = (28, 28), (14, 14), 1024, 32
WINDOW = 14


def features(rng, n: int, basis: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Correlated, heavy-ish features: a low-rank part with t(4) loadings plus per-channel noise."""
    low = rng.standard_t(4, (n, *GRID, RANK)).astype(np.float32) @ basis
    return low + rng.standard_normal((n, *GRID, C), dtype=np.float32) * scales


def build(root: str, n: int, shard: int) -> Cache:
    write_manifest(root, n)
    cache = Cache.open(root)
    f16 = cache.create_view(ViewSpec(key="f16@448", grid=GRID, channels=C, summary_channels=8, tile=TILE),
                            shard_size=shard)
    q8 = cache.create_view(ViewSpec(key="int8@448", grid=GRID, channels=C, summary_channels=8, tile=TILE,
                                    codec="int8-phis"), shard_size=shard)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((RANK, C)).astype(np.float32) * 3
    scales = np.geomspace(0.1, 2, C).astype(np.float32)
    codec = None
    for k in range(f16.num_shards):
        s, e = f16.shard_range(k)
        x = features(rng, e - s, basis, scales)
        summary, box = x[:, 0, 0, :8], np.zeros((e - s, 4), np.float32)
        if codec is None:
            cal = Calibration(C, x.size // C)
            cal.add(x, summary)
            result = cal.finish()
            store(q8, result["arrays"], result["summary"], result["quantization"])
            a, qz = result["arrays"], result["quantization"]
            codec = Int8Phis(a["mean"], a["rotation"], a["inverse"], qz["scale"], qz["knee"])
            print(f"int8-phis calibrated on shard 0: scale {qz['scale']:.4g}, knee {qz['knee']}, "
                  f"relative MSE {qz['relative_mse']:.2e} in PHI-S space")
        f16.write_shard(s, x.astype(np.float16), summary, box)
        q8.write_shard(s, codec.encode(torch.from_numpy(x)).numpy(), summary, box)
    store(f16, result["arrays"], result["summary"])  # the same PHI-S for the f16 view's phis reads
    return cache


def epoch(reader, order, windows, space: str) -> float:
    t0 = time.perf_counter()
    for i, (r, c) in zip(order, windows):
        reader.read_dense(int(i), (r, r + WINDOW, c, c + WINDOW), space=space)
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", os.getcwd())) as tmp:
        cache = build(tmp, args.images, args.shard)
        views = {name: cache.view(key) for name, key in (("f16", "f16@448"), ("int8-phis", "int8@448"))}
        readers = {name: v.reader() for name, v in views.items()}
        for r in readers.values():  # shard indices and the int8 table loaded outside the timing
            r.read_dense(0, space="phis")
        modes = {"cold stored": ("stored", True), "cold PHI-S floats": ("phis", True), "hot stored": ("stored", False)}
        rng = np.random.default_rng(1)
        rates = {(m, c): [] for m in modes for c in readers}
        for _ in range(args.rounds):
            order = rng.permutation(args.images)
            windows = rng.integers(0, GRID[0] - WINDOW + 1, (args.images, 2))
            for mode, (space, cold) in modes.items():
                for name, reader in readers.items():
                    if cold:
                        evict(views[name])
                    else:
                        epoch(reader, order, windows, space)  # warm the page cache
                    rates[mode, name].append(epoch(reader, order, windows, space))
        report(rates, modes, readers)


def report(rates: dict, modes: dict, readers: dict) -> None:
    window = (0, WINDOW, 0, WINDOW)
    sizes = {name: r.bytes_for(window) for name, r in readers.items()}
    print(f"one epoch of random {WINDOW}x{WINDOW} windows of a (28, 28, 1024) view in 14x14 tiles; "
          f"an aligned window moves {sizes['f16']} bytes (f16) / {sizes['int8-phis']} (int8-phis); median of rounds")
    for mode in modes:
        med = {name: statistics.median(rates[mode, name]) for name in readers}
        print(f"  {mode:18s} f16 {med['f16']:8.0f} samples/s   int8-phis {med['int8-phis']:8.0f} samples/s   "
              f"int8-phis / f16 = {med['int8-phis'] / med['f16']:.2f}x")


if __name__ == "__main__":
    main()
