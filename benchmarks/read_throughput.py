"""Random single-image reads of a (28, 28, 1024) float16 view in a local cache, cold and hot.

    PYTHONPATH=. python benchmarks/read_throughput.py [--images 256] [--reads 1500] [--rounds 8]

Compares, in one run and on the same cache: the featcache reader as it comes (every chunk's
crc32c checked), the reader with ``verify_checksums=False``, the raw-bytes ceiling (``os.pread``
of exactly the chunk's bytes, offsets known in advance) and plain zarr-python (``dense[i]``),
each in two passes:

- cold: every image once in a random order, the view's files evicted from the page cache
  (``posix_fadvise(DONTNEED)``, benchmarks/pagecache.py) before the pass, as an epoch over a cache
  larger than memory reads;
- hot: ``--reads`` random images with the files in the page cache (memory-bound).

Rounds interleave the methods so machine noise hits all of them alike; the median round is
reported. A second view stored in 14x14 spatial tiles shows what a 14x14 window read moves
compared with a whole-image read (hot).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import crc32c
import numpy as np
import zarr

from benchmarks.pagecache import evict, warm
from featcache.store import Cache, ViewSpec
from tests.support.caches import write_manifest

GRID, C = (28, 28), 1024
CHECKED, UNCHECKED, RAW, ZARR = "featcache (crc32c checked, default)", "featcache, checks off", "raw os.pread", \
    "zarr-python dense[i]"


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


def methods(view, root: str) -> dict:
    """The four ways to read ``dense[i]`` of ``view``; readers have their shard indices loaded."""
    checked, unchecked = view.reader(), view.reader(verify_checksums=False)
    for r in (checked, unchecked):
        for k in range(view.num_shards):
            r._shard_index(k)
    za = zarr.open_array(os.path.join(root, "features.zarr", view.key, "dense"), mode="r")
    return {CHECKED: checked.read_dense, UNCHECKED: unchecked.read_dense, RAW: raw_reader(view),
            ZARR: lambda i: za[i]}


def rate(fn, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        fn(int(i))
    return len(order) / (time.perf_counter() - t0)


def one_round(view, fns: dict, rng, args, samples: dict, turn: int) -> None:
    """A cold pass of each method (files evicted before each), then a hot pass of each; the
    methods' order rotates by ``turn`` so that none always runs first."""
    names = list(fns)[turn % len(fns):] + list(fns)[:turn % len(fns)]
    for name in names:
        evict(view)
        samples["cold", name].append(rate(fns[name], rng.permutation(args.images)))
    warm(view)
    order = rng.integers(0, args.images, args.reads)
    for name in names:
        samples["hot", name].append(rate(fns[name], order[:args.reads // 5] if name == ZARR else order))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard", type=int, default=32)
    ap.add_argument("--reads", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        cache = build(tmp, args.images, args.shard)
        whole, tiled = cache.view("whole@448"), cache.view("tiled@448")
        fns = methods(whole, tmp)
        rng = np.random.default_rng(1)
        samples = {(mode, m): [] for mode in ("cold", "hot") for m in fns}
        for turn in range(args.rounds):
            one_round(whole, fns, rng, args, samples, turn)
        report({k: statistics.median(v) for k, v in samples.items()}, whole, args)
        crc_report(fns[RAW])
        tiled_report(tiled.reader(), rng, args)


def report(med: dict, whole, args) -> None:
    mb = whole.reader().bytes_for(None) / 2**20
    print(f"random single-image dense reads, (28, 28, 1024) float16 ({mb:.2f} MiB per image), {args.images} images "
          f"in shards of {args.shard}, median of {args.rounds} rounds")
    print(f"  {'':38s} {'cold samples/s':>14s} {'GiB/s':>6s}   {'hot samples/s':>13s} {'GiB/s':>6s}")
    for name in (CHECKED, UNCHECKED, RAW, ZARR):
        cold, hot = med["cold", name], med["hot", name]
        print(f"  {name:38s} {cold:14.0f} {cold * mb / 1024:6.2f}   {hot:13.0f} {hot * mb / 1024:6.2f}")
    for mode in ("cold", "hot"):
        print(f"  {mode}: checksummed / raw = {med[mode, CHECKED] / med[mode, RAW]:.2f}x"
              f"{'  (target >= 0.9)' if mode == 'cold' else ''}   "
              f"checksummed / zarr-python = {med[mode, CHECKED] / med[mode, ZARR]:.2f}x"
              f"{'  (target >= 10)' if mode == 'cold' else ''}   "
              f"checks off / raw = {med[mode, UNCHECKED] / med[mode, RAW]:.2f}x")


def crc_report(read_raw) -> None:
    """The check's own cost: crc32c over one image's chunk bytes (page cache warm, best of 5)."""
    raw = read_raw(0)
    best = min(_seconds(lambda: crc32c.crc32c(raw), 200) for _ in range(5))
    print(f"crc32c of one image's chunk ({len(raw)} bytes), hardware_based={crc32c.hardware_based}: "
          f"{best * 1e6:.1f} us, {len(raw) / best / 1e9:.1f} GB/s")


def _seconds(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def tiled_report(reader, rng, args) -> None:
    """Hot reads of the 14x14-tiled view: an aligned window against the whole image."""
    order = rng.integers(0, args.images, args.reads)
    window = rate(lambda i: reader.read_dense(i, (0, 14, 14, 28)), order)
    whole = rate(reader.read_dense, order)
    w, full, straddle = (reader.bytes_for(x) for x in ((0, 14, 14, 28), None, (7, 21, 7, 21)))
    print(f"14x14 tiles, hot, checksummed: aligned 14x14 window {window:.0f} samples/s, whole image {whole:.0f}; "
          f"bytes moved per read: aligned window {w}, unaligned window {straddle}, whole image {full} "
          f"(aligned window = {w / full:.2f}x of whole)")


if __name__ == "__main__":
    main()
