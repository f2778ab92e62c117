"""Container sources: ``index`` over webdataset tar shards, and a worker's reads from tars vs loose files.

    PYTHONPATH=. python benchmarks/source_reads.py [--tars 100] [--per-tar 100] [--compare 2000] [--rounds 3]

Builds ``--tars`` shards of ``--per-tar`` small PNGs (32x24, distinct pixels) with a ``.cls`` label
each, and the same images as loose files; starts a SeaweedFS S3 server on loopback and uploads both.

1. ``featcache.index`` over the brace pattern of every shard, on local disk and on S3: images/s and
   bytes fetched per image (tar headers, label members, the images' first bytes), beside the tars'
   own bytes per image. Members this small fit many to a read window, so the whole tar is fetched
   (in a few requests per tar); the same is measured on ``--large`` shards of 20 noise PNGs of
   256x256 (197 KB each), where the images' bytes are skipped.
2. What a worker does before decoding (``ImageReader.read`` on 4 threads, a shard of 64 rows at a
   time, as ``ShardWorker`` does): images/s of decode-ready bytes for the first ``--compare`` images,
   from tar members on S3 (one ranged GET each) and from the loose files on S3, interleaved over
   ``--rounds`` rounds in one run; the median round of each and their ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import featcache
from featcache.sources.read import ImageReader, RowGroups
from tests.support.images import encode_rgb_png, small_png_bytes
from tests.support.seaweed import SeaweedServer

SHARD_ROWS, THREADS = 64, 4


def build(folder: Path, tars: int, per_tar: int) -> tuple[Path, Path]:
    """``tars/NNNNN.tar`` and the same images as ``loose/NNNNN/KEY.png``."""
    (folder / "tars").mkdir()
    for t in range(tars):
        loose = folder / "loose" / f"{t:05d}"
        loose.mkdir(parents=True)
        with tarfile.open(folder / "tars" / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                n = t * per_tar + i
                data = small_png_bytes(n)
                (loose / f"{n:07d}.png").write_bytes(data)
                for name, body in ((f"{n:07d}.cls", str(n % 1000).encode()), (f"{n:07d}.png", data)):
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    return folder / "tars", folder / "loose"


def build_large(folder: Path, tars: int, per_tar: int = 20) -> Path:
    """``large/NNNNN.tar``: 256x256 noise PNGs (incompressible: about 197 KB each) with labels."""
    rng = np.random.default_rng(0)
    images = [encode_rgb_png(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(4)]
    (folder / "large").mkdir()
    for t in range(tars):
        with tarfile.open(folder / "large" / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                for name, body in ((f"{i:05d}.cls", b"1"), (f"{i:05d}.png", images[i % len(images)])):
                    info = tarfile.TarInfo(name)
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    return folder / "large"


def timed_index(src: str, out: str) -> tuple[float, featcache.manifest.IndexResult]:
    t0 = time.perf_counter()
    result = featcache.index(src, out)
    return time.perf_counter() - t0, result


def read_all(manifest, rows: int) -> float:
    """Seconds to fetch the bytes of the first ``rows`` rows as a worker does (shards of 64, 4 threads)."""
    reader = ImageReader(manifest)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        for start in range(0, rows, SHARD_ROWS):
            read = partial(reader.read, groups=RowGroups())
            assert all(list(pool.map(read, range(start, min(start + SHARD_ROWS, rows)))))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tars", type=int, default=100)
    ap.add_argument("--per-tar", type=int, default=100)
    ap.add_argument("--compare", type=int, default=2000, help="images read from tars and from loose files on S3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large", type=int, default=10, help="shards of 20 large PNGs")
    args = ap.parse_args()
    n = args.tars * args.per_tar
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        tars, loose = build(tmp, args.tars, args.per_tar)
        large = build_large(tmp, args.large)
        tar_bytes = sum(p.stat().st_size for p in tars.iterdir())
        large_bytes = sum(p.stat().st_size for p in large.iterdir())
        pattern, large_pattern = f"{{00000..{args.tars - 1:05d}}}.tar", f"{{00000..{args.large - 1:05d}}}.tar"
        local_s, local = timed_index(f"{tars}/{pattern}", str(tmp / "c-local"))
        large_local_s, large_local = timed_index(f"{large}/{large_pattern}", str(tmp / "c-large-local"))
        with SeaweedServer(tmp / "seaweed") as server:
            os.environ.update(server.env())
            bucket = f"bench{uuid.uuid4().hex[:8]}"
            server.make_bucket(bucket)
            fs = server.filesystem()
            fs.put(str(tars) + "/", f"{bucket}/tars/", recursive=True)
            fs.put(str(large) + "/", f"{bucket}/large/", recursive=True)
            compared = sorted(loose.glob("*/*.png"))[:args.compare]
            fs.put([str(p) for p in compared], [f"{bucket}/loose/{p.parent.name}/{p.name}" for p in compared])
            s3_s, s3 = timed_index(f"s3://{bucket}/tars/{pattern}", str(tmp / "c-s3"))
            large_s3_s, large_s3 = timed_index(f"s3://{bucket}/large/{large_pattern}", str(tmp / "c-large-s3"))
            loose_s, _ = timed_index(f"s3://{bucket}/loose/**/*.png", str(tmp / "c-loose"))
            tar_rows = pq.read_table(tmp / "c-s3" / "manifest.parquet")
            loose_rows = pq.read_table(tmp / "c-loose" / "manifest.parquet")
            rows = min(args.compare, loose_rows.num_rows)
            assert tar_rows.column("member").to_pylist()[:rows] == [p.name for p in compared[:rows]]
            times = {"tar": [], "loose": []}
            for _ in range(args.rounds):  # interleaved: noise hits both alike
                times["tar"].append(read_all(tar_rows, rows))
                times["loose"].append(read_all(loose_rows, rows))
    assert local.images == s3.images == n
    print(f"{args.tars} tars x {args.per_tar} PNGs of 32x24 ({tar_bytes / n:.0f} tar bytes per image, "
          f"image + .cls member with their headers)")
    print(f"index, local disk   {n / local_s:8.0f} images/s  {local.bytes_read / n:8.0f} bytes read per image")
    print(f"index, S3           {n / s3_s:8.0f} images/s  {s3.bytes_read / n:8.0f} bytes read per image")
    print(f"index of {rows} loose files on S3 (for comparison): {rows / loose_s:.0f} images/s")
    m = args.large * 20
    print(f"{args.large} tars x 20 PNGs of 256x256 ({large_bytes / m:.0f} tar bytes per image)")
    for where, seconds, result in (("local disk", large_local_s, large_local), ("S3", large_s3_s, large_s3)):
        print(f"index, {where:<12} {m / seconds:8.0f} images/s  {result.bytes_read / m:8.0f} bytes read per image")
    tar_rate, loose_rate = (rows / statistics.median(times[k]) for k in ("tar", "loose"))
    print(f"worker reads on S3, {rows} images, {THREADS} threads, median of {args.rounds} rounds:")
    print(f"  tar members (one ranged GET each) {tar_rate:8.0f} images/s")
    print(f"  loose files                       {loose_rate:8.0f} images/s")
    print(f"tar members / loose files = {tar_rate / loose_rate:.2f}x")


if __name__ == "__main__":
    main()
