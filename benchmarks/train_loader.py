"""The training loader from a local cache, cold, against the disk's ceiling for the same windows (issue 12).

    PYTHONPATH=. python benchmarks/train_loader.py [--images 96] [--rounds 3] [--batch 8] [--json]

A local cache of ``--images`` real photos (the scikit-image photos, re-encoded as JPEG at 400-640 px
on the long side, as an ImageNet-like dataset is) with three teacher views of realistic channel
counts for 224-px student crops, random float16 features in the layout ``featcache extract`` writes
(one chunk per image, ``--tiles k`` for k x k spatial tiles), PHI-S statistics computed by
``featcache.stats.compute.compute_view``:

    siglip2@256   16 x 16 x 1536, summary 1536   (SigLIP2-g-like)
    dinov3@224    14 x 14 x 4096, summary 4096   (DINOv3-7B-like, the student's 224 px)
    sam3@1024     64 x 64 x 256,  summary 256    (SAM3-like, 256 channels; mean summary, not learnt)

One pass = one epoch of ``CacheDataset`` samples (student 224 px, crops by ``BatchPlan`` /
``sample_crop``) through a ``DataLoader`` with ``train.data.collate``, as ``Trainer.run`` builds it
(workers persist across passes as they do across a run's steps), with the views' files and the
image files evicted from the page cache before it (benchmarks/pagecache.py). Passes: data.workers 0
and 2, targets in ``raw`` space and in ``phis`` space (the training default: float views are read
as stored either way and their C x C transform runs on the training device, so both passes do the
same work here; ``--phis-batches`` reads only the epoch's first batches in the phis passes).
The ceiling: the exact byte ranges of the same samples' windows (every chunk of every view a
sample's crop needs, ``reader.bytes_for(window)`` bytes) read with plain ``os.pread``, cold, in the
same order, offsets known in advance. Rounds interleave every pass; medians are reported.

The workers-0 passes also time, per sample, ``CacheDataset.image`` (decode the source image) and
the view readers' ``read_dense_into`` (the windows read into the batch, in the dataset's reading
thread beside the decoding: the two overlap and do not add up). Last, one
``Trainer`` step of a tiny student at 224 px on this cache (batch already loaded) says whether the
loader is the bottleneck of a CPU step.
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
from PIL import Image

import featcache
from benchmarks.pagecache import evict
from featcache.geometry import CropConfig

#: the crops BENCHMARKS.md's figures were measured with: half of them free (interpolated lookups) and half
#: mirrored, the defaults before issue 25 (the heavier lookup mix; today's defaults align every crop)
CROPS = CropConfig(aligned_prob=0.5, flip_prob=0.5)
from featcache.stats.compute import compute_view
from featcache.store import Cache, ViewSpec
from featcache.train import config as train_config
from featcache.train.data import BatchPlan, CacheDataset, StepSampler, collate
from featcache.train.loop import Trainer
from tests.support.images import skimage_photos

#: (teacher, view key, grid, channels, summary channels)
VIEWS = (("siglip2", "siglip2@256", (16, 16), 1536, 1536),
         ("dinov3", "dinov3@224", (14, 14), 4096, 4096),
         ("sam3", "sam3@1024", (64, 64), 256, 256))
RESOLUTION, PATCH = 224, 16


# ---- the cache ---------------------------------------------------------------------------------

def photos(folder: Path, n: int) -> Path:
    """``n`` JPEG files (quality 90), the scikit-image photos in turn, long side 400-640 px."""
    folder.mkdir(parents=True)
    sources = skimage_photos()
    rng = np.random.default_rng(0)
    for i in range(n):
        im = Image.open(sources[i % len(sources)]).convert("RGB")
        scale = int(rng.integers(400, 641)) / max(im.size)
        im = im.resize((max(16, round(im.width * scale)), max(16, round(im.height * scale))), Image.BILINEAR)
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def build(root: Path, images: Path, shard: int, tiles: int) -> Cache:
    """Index ``images`` into ``root``, write the three views (random f16 features, box = whole
    image as the ``squash`` policy gives) and compute their statistics."""
    featcache.index(str(images), str(root))
    cache = Cache.open(str(root))
    sizes = np.stack([cache.manifest.column(c).to_numpy() for c in ("width", "height")], axis=1)
    rng = np.random.default_rng(1)
    for _, key, grid, c, cs in VIEWS:
        spec = ViewSpec(key=key, grid=grid, channels=c, summary_channels=cs, input_size=(grid[0] * PATCH,) * 2,
                        tile=(grid[0] // tiles, grid[1] // tiles), teacher={"family": key.split("@")[0]})
        view = cache.create_view(spec, shard_size=shard)
        for k in range(view.num_shards):
            s, e = view.shard_range(k)
            dense = rng.standard_normal((e - s, *grid, c), dtype=np.float32).astype(np.float16)
            box = np.concatenate([np.zeros((e - s, 2)), sizes[s:e]], axis=1).astype(np.float32)
            view.write_shard(s, dense, rng.standard_normal((e - s, cs), dtype=np.float32).astype(np.float16), box)
    for view in Cache.open(str(root)).views.values():
        compute_view(view)
    return Cache.open(str(root))


def evict_all(cache: Cache, images: Path) -> None:
    """Views and source images out of the page cache (``evict`` takes anything with ``loc.path``)."""
    for view in cache.views.values():
        evict(view)
    evict(types.SimpleNamespace(loc=types.SimpleNamespace(path=str(images))))


# ---- passes ------------------------------------------------------------------------------------

class Timed:
    """Sums the seconds a dataset spends in ``image`` (decode the source image; a batch reads the
    files first) and in its view readers' ``read_dense`` and ``read_dense_into`` (read a window, into
    the batch or converted to the target space), by wrapping them on the instances (the dataset's
    readers for this process), and can record every window read."""

    def __init__(self, ds: CacheDataset, record: bool = False):
        self.seconds = {"image": 0.0, "windows": 0.0}
        self.windows: list[tuple[str, int, tuple]] | None = [] if record else None
        ds.image = self._wrap("image", ds.image)
        for _, key, *_ in VIEWS:
            reader = ds.reader(key)
            reader.read_dense = self._wrap("windows", reader.read_dense, key)
            reader.read_dense_into = self._wrap("windows", reader.read_dense_into, key)

    def _wrap(self, name: str, fn, key: str | None = None):
        def timed(*args, **kwargs):
            if self.windows is not None and key is not None:
                self.windows.append((key, int(args[0]), tuple(args[1])))
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed

    def take(self) -> dict:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


def record_windows(ds: CacheDataset, plan: BatchPlan, steps: int) -> list[tuple[str, int, tuple]]:
    """Every window the samples of one pass read, in read order (seen by the dataset's readers)."""
    timed = Timed(ds, record=True)
    for step in range(steps):
        for item in plan.batch(step):
            ds[item]
    return timed.windows


def ranges(cache: Cache, windows) -> tuple[list, int]:
    """(fd, offset, length) of every chunk each window needs, in read order, and the bytes
    ``reader.bytes_for`` counts for them (the two must agree)."""
    readers = {key: cache.view(key).reader() for _, key, *_ in VIEWS}
    fds, out, counted = {}, [], 0
    for key, row, (r0, r1, c0, c1) in windows:
        rd = readers[key]
        (th, tw), shard_size = rd.spec.tile, rd.view.shard_size
        shard, local = divmod(row, shard_size)
        path = rd._path("dense", (shard, 0, 0, 0))  # the read_throughput.py way: offsets from the index
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        fd = fds[path]
        for a in range(r0 // th, (r1 - 1) // th + 1):
            for b in range(c0 // tw, (c1 - 1) // tw + 1):
                offset, nbytes = rd._shard_index(shard)[local, a, b, 0]
                out.append((fd, int(offset), int(nbytes)))
        counted += rd.bytes_for((r0, r1, c0, c1))
    assert sum(n for _, _, n in out) == counted, "byte ranges and reader.bytes_for disagree"
    return out, counted


def ceiling_pass(chunks: list) -> float:
    t0 = time.perf_counter()
    for fd, offset, nbytes in chunks:
        os.pread(fd, nbytes, offset)
    return time.perf_counter() - t0


def loader(ds: CacheDataset, plan: BatchPlan, steps: int, workers: int):
    return torch.utils.data.DataLoader(ds, batch_sampler=StepSampler(plan, 0, steps), num_workers=workers,
                                       collate_fn=collate, prefetch_factor=2 if workers else None,
                                       persistent_workers=workers > 0)


def loader_pass(dl) -> tuple[float, int, int]:
    """Seconds, samples and bytes of one epoch through ``dl`` (worker start-up excluded: the
    workers persist across passes, as they do across a run's steps)."""
    t0, n, nbytes = time.perf_counter(), 0, 0
    for batch in dl:
        n += len(batch["row"])
        nbytes += batch["bytes"]
    return time.perf_counter() - t0, n, nbytes


# ---- the training step -------------------------------------------------------------------------

def train_step(root: Path, out: Path, batch_size: int, student: str, steps: int = 2) -> dict:
    """Seconds per ``Trainer`` step (forward, losses, backward, clip, AdamW) on batches already
    loaded, and per batch load (``collate`` of ``trainer.dataset`` samples, raw, page cache warm)."""
    teachers = ", ".join(f'{{name = "{t}", low = "{k}"{", summary = 0.0" if t == "sam3" else ""}}}'
                         for t, k, *_ in VIEWS)
    cfg = train_config.load(None, cache=str(root), overrides=[
        f"teachers = [{teachers}]", f'student.size = "{student}"', f"optim.batch_size = {batch_size}",
        f"resolution.low = [{RESOLUTION}]", "data.heldout = 0.0", 'data.space = "raw"', "eval.pictures = false"])
    trainer = Trainer(cfg, out)
    load, step = [], []
    for k in range(steps + 1):
        t0 = time.perf_counter()
        batch = collate([trainer.dataset[item] for item in trainer.plan.batch(k)])
        t1 = time.perf_counter()
        loss = trainer.task.forward(batch, k)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.student.parameters(), cfg.optim.clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if k:  # the first is warm-up
            load.append(t1 - t0)
            step.append(time.perf_counter() - t1)
    return {"student": student, "batch": batch_size, "step_s": statistics.median(step),
            "load_warm_s": statistics.median(load), "flops_forward": trainer.student.num_flops(RESOLUTION, RESOLUTION)}


# ---- main --------------------------------------------------------------------------------------

#: pass name -> (target space, data.workers); phis passes read the epoch (or its first ``--phis-batches``)
PASSES = {"raw_workers0": ("raw", 0), "raw_workers2": ("raw", 2), "phis_workers0": ("phis", 0),
          "phis_workers2": ("phis", 2)}


def run(args, tmp: Path) -> dict:
    t0 = time.perf_counter()
    images = photos(tmp / "photos", args.images)
    cache = build(tmp / "cache", images, args.shard, args.tiles)
    built = time.perf_counter() - t0
    root, teachers = str(tmp / "cache"), {t: {"low": k} for t, k, *_ in VIEWS}
    plan = BatchPlan(np.arange(args.images), args.batch, 0, [RESOLUTION], [], 0.0)
    epoch = args.images // args.batch
    steps = {"raw": epoch, "phis": min(args.phis_batches or epoch, epoch)}
    windows = record_windows(CacheDataset(root, teachers, PATCH, CROPS, "raw"), plan, steps["raw"])
    ceilings = {}  # space -> (chunks, samples, bytes): the same samples' windows as that space's passes
    for space, n in steps.items():
        chunks, nbytes = ranges(cache, windows[:n * args.batch * len(VIEWS)])
        ceilings[space] = (chunks, n * args.batch, nbytes)
    datasets = {name: CacheDataset(root, teachers, PATCH, CROPS, space) for name, (space, _) in PASSES.items()}
    for ds in datasets.values():
        ds.lookahead = plan  # as Trainer sets it
    timers = {name: Timed(datasets[name]) for name, (_, w) in PASSES.items() if w == 0}
    loaders = {name: loader(datasets[name], plan, steps[space], w) for name, (space, w) in PASSES.items()}
    reported = {name: loader_pass(dl)[2] for name, dl in loaders.items()}  # warm-up: workers, readers, indices
    for t in timers.values():
        t.take()
    rates = {name: [] for name in [*PASSES, *(f"ceiling_{space}" for space in ceilings)]}
    split = {name: [] for name in timers}
    for r in range(args.rounds):
        order = list(rates)[r % len(rates):] + list(rates)[:r % len(rates)]
        for name in order:
            evict_all(cache, images)
            if name.startswith("ceiling_"):
                chunks, n, _ = ceilings[name[len("ceiling_"):]]
                rates[name].append(n / ceiling_pass(chunks))
                continue
            seconds, n, _ = loader_pass(loaders[name])
            rates[name].append(n / seconds)
            if name in timers:
                split[name].append({k: v / n for k, v in timers[name].take().items()} | {"total": seconds / n})
    image_bytes = sum(os.path.getsize(images / f) for f in os.listdir(images)) / args.images
    per_sample = {space: nbytes / n for space, (_, n, nbytes) in ceilings.items()}
    reported = {PASSES[k][0]: v / (steps[PASSES[k][0]] * args.batch) for k, v in reported.items()}
    return summarize(args, rates, split, per_sample, reported, image_bytes, built,
                     train_step(tmp / "cache", tmp / "run", args.batch, args.student))


def summarize(args, rates, split, per_sample, reported, image_bytes, built, step) -> dict:
    med = {name: statistics.median(v) for name, v in rates.items()}
    step_rate = step["batch"] / step["step_s"]
    loaders = {name: med[name] for name in PASSES}
    return {
        "images": args.images, "batch": args.batch, "rounds": args.rounds, "tiles": args.tiles,
        "phis_samples": min(args.phis_batches or args.images // args.batch, args.images // args.batch) * args.batch,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "build_s": built,
        "views": {k: {"grid": list(g), "channels": c, "summary_channels": cs} for _, k, g, c, cs in VIEWS},
        "bytes_per_sample": {"windows": per_sample["raw"], "windows_phis_passes": per_sample["phis"],
                             "dataset_reported": reported["raw"], "image_file": image_bytes},
        "samples_per_s": loaders, "ceiling_samples_per_s": {s: med[f"ceiling_{s}"] for s in ("raw", "phis")},
        "ratio_to_ceiling": {name: v / med[f"ceiling_{PASSES[name][0]}"] for name, v in loaders.items()},
        "ceiling_gib_per_s": med["ceiling_raw"] * per_sample["raw"] / 2**30,
        "seconds_per_sample_workers0": {name: {k: statistics.median(s[k] for s in v) for k in v[0]}
                                        for name, v in split.items()},
        "train_step": step | {"samples_per_s": step_rate},
        "loader_vs_step": {name: v / step_rate for name, v in loaders.items()},
        "target_ratio": 0.8,
    }


def show(s: dict) -> None:
    b = s["bytes_per_sample"]
    print(f"{s['images']} JPEG photos, views " + ", ".join(f"{k} {v['grid'][0]}x{v['grid'][1]}x{v['channels']}"
                                                          for k, v in s["views"].items())
          + f" (f16, {s['tiles']}x{s['tiles']} tiles per image), student {RESOLUTION} px, batch {s['batch']}, "
          f"median of {s['rounds']} interleaved cold rounds, {s['torch_threads']} torch/BLAS threads, load average "
          + ", ".join(f"{x:.2f}" for x in s["load_average"]) + f"; cache built in {s['build_s']:.0f} s")
    print(f"  bytes read per sample: windows {b['windows'] / 1e6:.2f} MB (CacheDataset reports "
          f"{b['dataset_reported'] / 1e6:.2f} MB), source image file {b['image_file'] / 1e3:.0f} kB; raw passes: "
          f"the epoch ({s['images']} samples), phis passes: its first {s['phis_samples']}")
    print(f"  {'pass':16s} {'samples/s':>10s} {'MB/s':>7s} {'ceiling':>9s} {'/ ceiling':>10s} {'/ CPU step':>11s}")
    for name, v in s["samples_per_s"].items():
        space = name.split("_")[0]
        ceiling = s["ceiling_samples_per_s"][space]
        print(f"  {name:16s} {v:10.1f} {v * b['windows'] / 1e6:7.0f} {ceiling:9.1f} "
              f"{s['ratio_to_ceiling'][name]:10.3f} {s['loader_vs_step'][name]:10.1f}x")
    print(f"  ceiling = os.pread of exactly the same windows' chunks, cold, same order: "
          f"{s['ceiling_gib_per_s']:.2f} GiB/s (target: loader >= {s['target_ratio']} of it)")
    for name, v in s["seconds_per_sample_workers0"].items():
        print(f"  {name}: {v['total'] * 1e3:.1f} ms per sample; of it source image decode {v['image'] * 1e3:.1f} "
              f"({v['image'] / v['total']:.0%}), and beside it in a thread the windows' reads "
              f"{v['windows'] * 1e3:.1f} ({v['windows'] / v['total']:.0%}, waiting on the disk included)")
    t = s["train_step"]
    print(f"  Trainer step, {t['student']} student at {RESOLUTION} px, batch {t['batch']}, batch already loaded: "
          f"{t['step_s'] * 1e3:.0f} ms = {t['samples_per_s']:.1f} samples/s ({3 * t['flops_forward'] / 1e9:.1f} "
          f"GFLOP per sample); loading that batch (raw, page cache warm, in-process): {t['load_warm_s'] * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--shard", type=int, default=32)
    ap.add_argument("--tiles", type=int, default=1, help="k x k spatial tiles per image (1: what extract writes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phis-batches", type=int, default=0, help="batches the phis passes read [0: the epoch]")
    ap.add_argument("--student", default="tiny", help="student size of the Trainer step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (1: two threads stall each other on a shared 2-core machine)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:  # numpy's BLAS (the PHI-S transform in the reader) stalls the same way with 2 threads
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result)) if args.json else show(result)


if __name__ == "__main__":
    main()
