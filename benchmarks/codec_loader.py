"""The training loader, cold, on one cache holding the same features as f16, int8-phis and int4-pca (issue 27).

    PYTHONPATH=. python benchmarks/codec_loader.py [--images 96] [--rounds 3] [--batch 8] [--workers 0] [--json]

A local cache of ``--images`` real photos (train_loader.py's JPEG copies of the scikit-image photos) with
three views of the same synthetic DINOv3-7B-like features, 14 x 14 x 4096 at 224 px (a low-rank part with
t(4) loadings plus per-channel noise), one per codec; the calibrated codecs are calibrated by their own
code on the first shard (``featcache.stats.calibrate.Calibration``), the f16 view gets the same PHI-S
statistics. One pass = one epoch of ``CacheDataset`` samples (224 px student crops, PHI-S targets: the
training default) through the ``DataLoader`` + ``collate`` ``Trainer.run`` builds, the view's files and
the photos evicted from the page cache first (benchmarks/pagecache.py). Rounds interleave the codecs;
medians are reported, with the ratio int4-pca / int8-phis measured in the same run.

What each loader hands over differs: f16 its stored halves (the device applies PHI-S), int8-phis
PHI-S floats (decoded on the loader's CPU, one table lookup per code), int4-pca its stored bytes
(decoded on the training device). The device's share is timed apart (int4-pca's ``decode_torch`` of a
batch's windows, f16's PHI-S transform; here on this CPU) so that the loader's figure does not hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import featcache
from benchmarks.pagecache import evict
from benchmarks.train_loader import CROPS, PATCH, RESOLUTION, loader, loader_pass, photos
from featcache.stats.calibrate import Calibration
from featcache.stats.compute import store
from featcache.store import Cache, ViewSpec
from featcache.store.codec import codec_named
from featcache.train.data import BatchPlan, CacheDataset

GRID, C, CS, RANK = (14, 14), 4096, 64, 64
CODECS = ("f16", "int8-phis", "int4-pca")


def features(rng, n: int, basis: np.ndarray, scales: np.ndarray) -> np.ndarray:
    low = rng.standard_t(4, (n, *GRID, RANK)).astype(np.float32) @ basis
    return low + rng.standard_normal((n, *GRID, C), dtype=np.float32) * scales


def build(root: Path, images: Path, shard: int) -> tuple[Cache, dict]:
    """Index the photos, write one view per codec of the same features; returns the cache and each
    calibration's relative MSE."""
    featcache.index(str(images), str(root))
    cache = Cache.open(str(root))
    sizes = np.stack([cache.manifest.column(c).to_numpy() for c in ("width", "height")], axis=1)
    views = {name: cache.create_view(ViewSpec(key=f"{name.split('-')[0]}@224", grid=GRID, channels=C,
                                              summary_channels=CS, input_size=(224, 224), codec=name,
                                              teacher={"family": "dinov3"}), shard_size=shard)
             for name in CODECS}
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((RANK, C)).astype(np.float32) * 3
    scales = np.geomspace(0.1, 2, C).astype(np.float32)
    codecs, errors, first = {}, {}, None
    for k in range(views["f16"].num_shards):
        s, e = views["f16"].shard_range(k)
        x = features(rng, e - s, basis, scales)
        summary = x[:, 0, 0, :CS].astype(np.float16)
        box = np.concatenate([np.zeros((e - s, 2)), sizes[s:e]], axis=1).astype(np.float32)
        for name, view in views.items():
            cls = codec_named(name)
            if name not in codecs and cls.needs_calibration:
                cal = Calibration(C, x.size // C, codec=cls)
                cal.add(x, summary)
                result = cal.finish()
                store(view, result["arrays"], result["summary"], result["quantization"])
                first = first or result
                errors[name] = result["quantization"]["relative_mse"]
            if name not in codecs:
                codecs[name] = cls.open(Cache.open(str(root)).view(view.key))
            view.write_shard(s, codecs[name].encode(torch.from_numpy(x)).numpy(), summary, box)
    store(views["f16"], {k: v for k, v in first["arrays"].items() if k != "codec_basis"}, first["summary"])
    return Cache.open(str(root)), errors


def evict_all(cache: Cache, images: Path) -> None:
    for view in cache.views.values():
        evict(view)
    evict(types.SimpleNamespace(loc=types.SimpleNamespace(path=str(images))))


def decode_seconds(ds: CacheDataset, plan: BatchPlan, key: str, batches: int) -> float:
    """Seconds per sample of the training device's work to bring ``key``'s windows to PHI-S floats (this CPU
    here): int4-pca's decoding, f16's (x − μ)Rᵀ (the trainer runs it after the lookup, on the student grid's
    cells, a few fewer than the window's), none for int8-phis (the loader's CPU decoded it)."""
    from featcache.train.data import collate

    decode, phis = ds.views.device_decoder(key), ds.views.phis_transform(key)
    if decode is None and phis is not None:
        mean, rotation = (torch.from_numpy(a) for a in phis)
        decode = lambda w: (w.float() - mean) @ rotation.T  # noqa: E731
    if decode is None:
        return 0.0
    total, n = 0.0, 0
    for step in range(batches):
        batch = collate([ds[item] for item in plan.batch(step)])
        window = batch["t"]["window"]
        t0 = time.perf_counter()
        decode(window)
        total += time.perf_counter() - t0
        n += len(window)
    return total / n


def run(args, tmp: Path) -> dict:
    t0 = time.perf_counter()
    images = photos(tmp / "photos", args.images)
    cache, errors = build(tmp / "cache", images, args.shard)
    built = time.perf_counter() - t0
    plan = BatchPlan(np.arange(args.images), args.batch, 0, [RESOLUTION], [], 0.0)
    steps = args.images // args.batch
    keys = {name: f"{name.split('-')[0]}@224" for name in CODECS}
    datasets = {name: CacheDataset(str(cache.root.uri), {"t": {"low": keys[name]}}, PATCH, CROPS, "phis")
                for name in CODECS}
    for ds in datasets.values():
        ds.lookahead = plan
    loaders = {name: loader(ds, plan, steps, args.workers) for name, ds in datasets.items()}
    moved = {name: loader_pass(dl)[2] / (steps * args.batch) for name, dl in loaders.items()}  # warm-up
    rates = {name: [] for name in CODECS}
    for r in range(args.rounds):
        for name in CODECS[r % 3:] + CODECS[:r % 3]:
            evict_all(cache, images)
            seconds, n, _ = loader_pass(loaders[name])
            rates[name].append(n / seconds)
    med = {name: statistics.median(v) for name, v in rates.items()}
    return {"images": args.images, "batch": args.batch, "rounds": args.rounds, "workers": args.workers,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "build_s": built,
            "view": {"grid": list(GRID), "channels": C}, "relative_mse_calibration": errors,
            "bytes_per_sample": moved, "samples_per_s": med, "rounds_samples_per_s": rates,
            "ratio_int4_pca_to_int8_phis": med["int4-pca"] / med["int8-phis"],
            "ratio_int4_pca_to_f16": med["int4-pca"] / med["f16"],
            "device_decode_s_per_sample": {name: decode_seconds(datasets[name], plan, keys[name], min(3, steps))
                                           for name in CODECS}}


def show(s: dict) -> None:
    print(f"{s['images']} JPEG photos, one {s['view']['grid'][0]}x{s['view']['grid'][1]}x{s['view']['channels']} "
          f"view per codec, student {RESOLUTION} px, batch {s['batch']}, data.workers {s['workers']}, PHI-S targets, "
          f"median of {s['rounds']} interleaved cold rounds, {s['torch_threads']} torch threads, load average "
          + ", ".join(f"{x:.2f}" for x in s["load_average"]) + f"; built in {s['build_s']:.0f} s")
    print(f"  {'codec':10s} {'samples/s':>10s} {'window MB/sample':>17s} {'calibration MSE':>16s} "
          f"{'device ms/sample':>17s}")
    for name, v in s["samples_per_s"].items():
        err = s["relative_mse_calibration"].get(name)
        print(f"  {name:10s} {v:10.1f} {s['bytes_per_sample'][name] / 1e6:17.3f} "
              f"{'-' if err is None else f'{err:.2e}':>16s} {s['device_decode_s_per_sample'][name] * 1e3:17.2f}")
    print(f"  int4-pca / int8-phis = {s['ratio_int4_pca_to_int8_phis']:.2f}x, int4-pca / f16 = "
          f"{s['ratio_int4_pca_to_f16']:.2f}x (loader samples/s, same run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--shard", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", os.getcwd())) as tmp:
        summary = run(args, Path(tmp))
    print(json.dumps(summary, indent=1) if args.json else "", end="")
    show(summary)


if __name__ == "__main__":
    main()
