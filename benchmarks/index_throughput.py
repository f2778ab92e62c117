"""``featcache index`` over 10,000 small PNG files: files/s, reading headers only.

    python benchmarks/index_throughput.py [--files 10000] [--workers 8]

In one run, on the same files (page cache warm after writing them): featcache.index, the loop a
user would write by hand (``PIL.Image.open(p).size`` over ``sorted(glob)``), and the same loop
decoding the pixels (``.load()``), which index must never do.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

from PIL import Image

import featcache
from tests.support.images import write_nested_small_pngs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pil_loop(paths: list[str], decode: bool) -> None:
    for p in paths:
        with Image.open(p) as im:
            if decode:
                im.load()
            im.size  # noqa: B018


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=None, help="header threads (default: featcache's own)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        src = os.path.join(tmp, "src")
        write_nested_small_pngs(__import__("pathlib").Path(src), args.files)
        paths = sorted(glob.glob(os.path.join(src, "**", "*.png"), recursive=True))
        t_index = timed(lambda: featcache.index(src, os.path.join(tmp, "cache"), workers=args.workers))
        t_pil = timed(lambda: pil_loop(paths, decode=False))
        t_decode = timed(lambda: pil_loop(paths, decode=True))
    n = args.files
    print(f"{n} small PNG files (32x24), header threads: {args.workers or 'default'}")
    print(f"  featcache index            {n / t_index:8.0f} files/s  (listing, headers, manifest written)")
    print(f"  PIL.Image.open().size loop {n / t_pil:8.0f} files/s")
    print(f"  PIL open + decode loop     {n / t_decode:8.0f} files/s")
    print(f"featcache index / hand-written header loop = {t_pil / t_index:.2f}x")


if __name__ == "__main__":
    main()
