"""Random single-image reads of a (28, 28, 1024) float16 view in a local cache.

    python benchmarks/read_throughput.py [--images 256] [--reads 1500] [--rounds 5]

Compares, in one run and on the same cache: the featcache reader, plain zarr-python indexing
(``dense[i]``), and the raw-bytes ceiling (``os.pread`` of exactly the chunk's bytes, offsets
known in advance). Rounds interleave the three so machine noise hits all of them alike; the
median round is reported. A second view stored in 14x14 spatial tiles shows what a 14x14 window
read moves compared with a whole-image read. The cache is in the page cache (just written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import zarr

from featcache.store import Cache, ViewSpec
from tests.support.caches import write_manifest

GRID, C = (28, 28), 1024


def build(root: str, n: int, shard: int) -> Cache:
    write_manifest(root, n)
    cache = Cache.open(root)
    rng = np.random.default_rng(0)
    for key, tile in (("whole@448", None), ("tiled@448", (14, 14))):
        view = cache.create_view(ViewSpec(key=key, grid=GRID, channels=C, summary_channels=C, tile=tile),
                                 shard_size=shard)
        for k in range(view.num_shards):
            s, e = view.shard_range(k)
            dense = rng.standard_normal((e - s, *GRID, C), dtype=np.float32).astype(np.float16)
            view.write_shard(s, dense, dense[:, 0, 0], np.zeros((e - s, 4), np.float32))
    return cache


def raw_reader(view):
    """os.pread of each image's chunk bytes, offsets taken from the shard indices up front."""
    fr = view.reader()
    places = []
    for i in range(view.num_images):
        shard, local = divmod(i, view.shard_size)
        off, nbytes = fr._shard_index(shard)[local, 0, 0, 0]
        places.append((os.open(fr._path("dense", (shard, 0, 0, 0)), os.O_RDONLY), int(off), int(nbytes)))
    return lambda i: os.pread(places[i][0], places[i][2], places[i][1])


def rate(fn, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        fn(i)
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard", type=int, default=32)
    ap.add_argument("--reads", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        cache = build(tmp, args.images, args.shard)
        whole, tiled = cache.view("whole@448"), cache.view("tiled@448")
        fc, fc_crc = whole.reader(), whole.reader(verify_checksums=True)
        tiled_reader = tiled.reader()
        za = zarr.open_array(os.path.join(tmp, "features.zarr", "whole@448", "dense"), mode="r")
        methods = {
            "featcache": fc.read_dense,
            "featcache+crc": fc_crc.read_dense,
            "zarr-python": lambda i: za[i],
            "raw pread": raw_reader(whole),
            "featcache 14x14 window (tiled)": lambda i: tiled_reader.read_dense(i, (0, 14, 14, 28)),
            "featcache whole image (tiled)": tiled_reader.read_dense,
        }
        rng = np.random.default_rng(1)
        samples = {m: [] for m in methods}
        for _ in range(args.rounds):
            order = rng.integers(0, args.images, args.reads)
            for name, fn in methods.items():
                n = args.reads // 5 if name == "zarr-python" else args.reads
                samples[name].append(rate(fn, order[:n]))
        report(samples, whole, tiled_reader)


def report(samples: dict, whole, tiled_reader) -> None:
    med = {m: statistics.median(v) for m, v in samples.items()}
    mb = whole.reader().bytes_for(None) / 2**20
    print(f"random single-image reads, (28, 28, 1024) float16 ({mb:.2f} MiB per image), median of rounds")
    for name, r in med.items():
        moved = mb / 4 if "window" in name else mb
        print(f"  {name:32s} {r:9.0f} samples/s  {r * moved / 1024:6.2f} GiB/s")
    print(f"featcache / zarr-python      = {med['featcache'] / med['zarr-python']:.2f}x   (target >= 2)")
    print(f"featcache / raw pread        = {med['featcache'] / med['raw pread']:.2f}x   (target >= 0.7)")
    print(f"featcache+crc / raw pread    = {med['featcache+crc'] / med['raw pread']:.2f}x")
    window, full = tiled_reader.bytes_for((0, 14, 14, 28)), tiled_reader.bytes_for(None)
    straddle = tiled_reader.bytes_for((7, 21, 7, 21))
    print(f"bytes moved per read, 14x14 tiles: aligned 14x14 window {window}, unaligned 14x14 window {straddle}, "
          f"whole image {full} (aligned window = {window / full:.2f}x of whole)")


if __name__ == "__main__":
    main()
