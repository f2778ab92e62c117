"""Training from a cache on S3: shard-sequential reads against today's ranged reads and a whole-object GET
ceiling (issue 26).

    PYTHONPATH=. python benchmarks/shard_reads.py [--images 128] [--shard 16] [--buffer 2] [--epochs 3] [--rounds 2]

The cache of benchmarks/train_loader.py (``--images`` re-encoded photos, three views of realistic channel
counts: siglip2@256 16x16x1536, dinov3@224 14x14x4096, sam3@1024 64x64x256, f16, one chunk per image), built
on local disk with ``--shard`` images per shard and uploaded to a SeaweedFS S3 server on loopback; the
photos stay local (the manifest names them), so every pass decodes the same images and only the views' reads
differ. One pass = ``--epochs`` epochs of student samples at 224 px through ``CacheDataset`` and a ``DataLoader``
(workers 0), as ``Trainer.run`` builds it, with a fresh dataset (nothing held from an earlier pass; several
epochs, so that the shards pass's start, before its first group arrives, and the groups it fetches ahead past
the pass's end weigh as they would in a long run, not as in one short epoch):

- ``windows``: ``data.read = "windows"``, the batches of ``BatchPlan`` (a global permutation), each window a
  ranged GET;
- ``shards``: ``data.read = "shards"``, the batches of ``ShardPlan`` (``--buffer`` shards shuffled together),
  each shard object fetched whole, the next group while this one is read;
- ``ceiling``: every object an epoch's ``shards`` pass fetches (each view's dense and small arrays of every
  shard), ``--epochs`` times, GET whole on as many threads as the shards pass uses (4 per view), nothing
  decoded: the most the store gives;
- ``shards, reads only`` and ``windows, reads only``: the same passes with the images neither read nor decoded
  (a blank student crop): the reading path alone, what the ceiling bounds.

Samples/s of each (median of ``--rounds`` interleaved rounds), shards / ceiling (reads only: the I/O target) and
shards / windows (whole passes: what training sees on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.train_loader import PATCH, RESOLUTION, VIEWS, build, loader, loader_pass, photos
from featcache.geometry import CropConfig
from featcache.store.cache import Cache
from featcache.train.data import AHEAD, BatchPlan, CacheDataset, ShardPlan
from tests.support.seaweed import SeaweedServer

BATCH, THREADS = 8, 4 * len(VIEWS)  # THREADS: featcache.store.reader.WholeObjects' 4, per view


def dataset(root: str, whole_shards: int) -> CacheDataset:
    return CacheDataset(root, {t: {"low": key, "high": key} for t, key, *_ in VIEWS}, PATCH, CropConfig(),
                        "raw", whole_shards=whole_shards)


def blank_images(ds: CacheDataset) -> None:
    """The dataset's images neither read nor decoded: every student crop a blank one."""
    blank = torch.zeros(3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
    ds.views.image_bytes = lambda row: b""
    ds._pixels = lambda item, plan, data=None: {"image": blank}


def windows_pass(root: str, rows, steps: int, reads_only: bool = False) -> float:
    ds = dataset(root, 0)
    plan = BatchPlan(rows, BATCH, 0, [RESOLUTION], [], 0.0)
    ds.lookahead = plan
    if reads_only:
        blank_images(ds)
    seconds, n, _ = loader_pass(loader(ds, plan, steps, 0))
    return n / seconds


def shards_pass(root: str, rows, steps: int, shard: int, buffer: int, reads_only: bool = False) -> float:
    ds = dataset(root, (1 + AHEAD) * buffer)
    plan = ShardPlan(rows, shard, BATCH, 0, [RESOLUTION], [], 0.0, buffer=buffer)
    ds.lookahead = plan
    if reads_only:
        blank_images(ds)
    seconds, n, _ = loader_pass(loader(ds, plan, steps, 0))
    return n / seconds


def ceiling_pass(root: str, images: int, epochs: int) -> float:
    """Images/s of GETting every object a shards pass fetches, whole, ``epochs`` times, on ``THREADS`` threads."""
    cache = Cache.open(root)
    paths = []
    for _, key, *_ in VIEWS:
        view = cache.view(key)
        for name in ("dense", "summary", "box", "valid"):
            paths += view.loc.backend.find(view.loc.join(name).path)
    backend = cache.view(VIEWS[0][1]).loc.backend
    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        objects = [p for p in paths if not p.endswith("zarr.json")] * epochs
        total = sum(len(b) for b in pool.map(backend.read, objects))
    seconds = time.perf_counter() - t0
    return images * epochs / seconds, total // epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--shard", type=int, default=16)
    ap.add_argument("--buffer", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        local = build(tmp / "cache", photos(tmp / "photos", args.images), args.shard, 1)
        with SeaweedServer(tmp / "seaweed") as server:
            os.environ.update(server.env())
            bucket = f"bench{uuid.uuid4().hex[:8]}"
            server.make_bucket(bucket)
            server.filesystem().put(str(tmp / "cache") + "/", f"{bucket}/cache/", recursive=True)
            root = f"s3://{bucket}/cache"
            rows = list(range(local.num_images))
            steps = args.epochs * len(rows) // BATCH
            rates = {"windows": [], "shards": [], "windows, reads only": [], "shards, reads only": [], "ceiling": []}
            stored = 0
            for _ in range(args.rounds):
                rates["ceiling"].append((c := ceiling_pass(root, len(rows), args.epochs))[0])
                stored = c[1]
                rates["shards, reads only"].append(shards_pass(root, rows, steps, args.shard, args.buffer, True))
                rates["windows, reads only"].append(windows_pass(root, rows, steps, True))
                rates["shards"].append(shards_pass(root, rows, steps, args.shard, args.buffer))
                rates["windows"].append(windows_pass(root, rows, steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"images": len(rows), "epochs": args.epochs, "shard": args.shard, "buffer": args.buffer, "rounds": args.rounds,
           "stored_mb": round(stored / 2**20, 1), "samples_per_s": {k: round(v, 2) for k, v in med.items()},
           "shards_over_ceiling": round(med["shards, reads only"] / med["ceiling"], 3),
           "shards_over_windows": round(med["shards"] / med["windows"], 2),
           "reads_only_shards_over_windows": round(med["shards, reads only"] / med["windows, reads only"], 2),
           "all": rates}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['images']} images x {args.epochs} epochs, {args.shard} per shard, {out['stored_mb']} MB of view objects, buffer "
          f"{args.buffer} shards, median of {args.rounds} rounds (torch {args.threads} thread(s))")
    for k in rates:
        print(f"  {k:20s} {med[k]:8.2f} samples/s")
    print(f"  shards / ceiling (reads only) {out['shards_over_ceiling']:.3f}   shards / windows "
          f"{out['shards_over_windows']:.2f} (reads only {out['reads_only_shards_over_windows']:.2f})")


if __name__ == "__main__":
    main()
