"""Full-size teachers on a lent GPU: bare forward, MFU, and the extract pipeline's efficiency (issue 13).

    python benchmarks/gpu_extract.py [--presets dinov3-7b,siglip2-g-384,sam3] [--batch 32] [--shards 8] [--json]
    python benchmarks/gpu_extract.py --device cpu --tiny       # smoke test of this script: < 1 min on a CPU

Runs without Ray and without zarr, from a checkout that is not installed (``benchmarks/checkout.py``):
a GPU machine lent for a benchmark may hold torch, transformers and little else; the modules used
here (teachers, views, decode, roofline) need neither.

Per preset (TEACHERS.md; featcache/teachers/presets.py), random weights created in bf16 on the
device (no float32 copy), SDPA attention, bf16 autocast, as ``extract`` runs the teachers:

- bare forward: images/s of the model on views already on the device (median of ``--rounds``), and
  MFU = images/s x analytic FLOPs per image (featcache.roofline) / a bf16 8192^3 matmul measured in
  the same run (the faster of a measurement before and one after the presets);
- pipeline: the ShardWorker's structure with raw files in place of the cache. A prefetch thread
  decodes the next shard on a thread pool (into pinned memory); a compute thread copies images to
  the device without waiting, makes the views, runs ``Teacher.extract`` (outputs in bf16), casts to
  f16 and checks finiteness on the device and copies to pinned host buffers on a side stream
  without waiting (one batch in flight); a queue of one computed shard; a writer thread ``np.save``s
  dense, summary and box and fsyncs them (the shard writer fsyncs too). Steady state = images /
  time from the first shard's write to the last one's; efficiency = steady state / bare forward;
  write GB/s = bytes / the writer's seconds. The driver's one-shard-per-call look-ahead and zarr's
  encoding are not in it (benchmarks/shard_writer.py measures that writer).

Photos: synthetic JPEGs at ImageNet-like sizes decoded by featcache.decode, or, where Pillow is
missing, uint8 arrays in .npy files (the decode stage is then ``np.load``; the output says which).
Targets on H100/H200: DINOv3-7B@224 MFU >= 60% and pipeline >= 0.95; SigLIP2-g@384 MFU >= 55%;
SAM3@1008 MFU >= 35%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MFU_TARGETS = {"dinov3-7b": 0.60, "siglip2-g-384": 0.55, "sam3": 0.35}
PIPELINE_TARGET = {"dinov3-7b": 0.95}
#: --tiny: each preset's config scaled down (same classes and input rules), for a CPU smoke run
TINY = {"siglip2-g-384": dict(image_size=64),
        "dinov3-7b": dict(image_size=64),
        "sam3": dict(image_size=112, window_size=4, global_attn_indexes=[1], pretrain_image_size=56)}
TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
PHOTO_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480)]  # ImageNet-like (W, H)


# ---- teachers -------------------------------------------------------------------------------


def build_teacher(preset, device: str, tiny: bool):
    """The preset's teacher with random weights created in the teachers' dtype on ``device``, and its
    FLOPs per image."""
    from featcache.roofline import vit_flops
    from featcache.teachers.base import family_class, weights_dtype
    from featcache.teachers.presets import model_classes
    from featcache.teachers.spec import TeacherSpec

    cls, config_cls = model_classes(preset.family)
    config, shape = preset.config, preset.shape
    if tiny:
        config = {**config, **TINY_WIDTH, **TINY[preset.name]}
        shape = dataclasses.replace(shape, width=64, mlp=128, layers=2, window=16 if shape.window else None,
                                    global_layers=1 if shape.window else 0)
    with torch.device(device):
        model = cls._from_config(config_cls(**config), dtype=weights_dtype(device)).eval()
    family = family_class(preset.family)
    spec = TeacherSpec(family=preset.family, name=preset.family, source=f"random:{preset.name}", revision=None,
                       weights_hash=None, model_type=model.config.model_type, **family._spec_fields(model, ""))
    teacher = family(model, spec, device=device)
    return teacher, vit_flops(shape, *spec.input_size)


def bare_forward(teacher, batch: int, reps: int, rounds: int) -> float:
    """Median images/s of the model alone on normalized views already on the device."""
    from benchmarks.teacher_throughput import rate

    pixels = torch.randn(batch, 3, *teacher.spec.input_size, device=teacher.device)
    cuda = teacher.device.type == "cuda"

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            teacher.model(pixel_values=pixels)

    forward()  # warm-up
    return statistics.median(rate(forward, batch, reps, str(teacher.device)) for _ in range(rounds))


# ---- photos ---------------------------------------------------------------------------------


def make_photos(folder: Path, n: int, distinct: int = 16) -> tuple[list[Path], str]:
    """``n`` photo files (copies of ``distinct`` synthetic ones) and how they are decoded."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i in range(distinct):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # blocks: compresses like a photo
        pixels = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:h, :w]
        blobs.append(pixels)
    suffix = ".jpg" if Image is not None else ".npy"
    paths = [folder / f"{i:05d}{suffix}" for i in range(n)]
    for i, path in enumerate(paths):
        pixels = blobs[i % distinct]
        if Image is not None:
            Image.fromarray(pixels).save(path, quality=90)
        else:
            np.save(path, np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return paths, "featcache.decode (JPEG)" if Image is not None else "np.load (no Pillow here)"


def decoder(paths: list[Path]):
    if paths[0].suffix == ".jpg":
        from featcache.decode import decode

        return lambda p: decode(p.read_bytes(), str(p))
    return lambda p: torch.from_numpy(np.load(p))


# ---- the pipeline ---------------------------------------------------------------------------


def compute_shard(teacher, images: list[torch.Tensor], batch: int, copies) -> dict[str, np.ndarray]:
    """One shard's dense (f16), summary (f16), box and finiteness in host memory, as the worker makes them."""
    spec, device, n = teacher.spec, teacher.device, len(images)
    pin = copies is not None
    host = {"dense": torch.empty((n, *spec.grid(), spec.channels), dtype=torch.float16, pin_memory=pin),
            "summary": torch.empty((n, spec.summary_channels), dtype=torch.float16, pin_memory=pin),
            "finite": torch.empty(n, dtype=torch.bool, pin_memory=pin)}
    boxes, pending = np.empty((n, 4), np.float32), []
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        pixels, box = make_views([im.to(device, non_blocking=True) for im in images[lo:hi]], spec, device=device)
        out = teacher.extract(pixels, dtype=None)
        finite = torch.isfinite(out.dense).flatten(1).all(1) & torch.isfinite(out.summary).all(1)
        sources = {"dense": out.dense.to(torch.float16), "summary": out.summary.to(torch.float16), "finite": finite}
        boxes[lo:hi] = box.numpy()
        pending.append(to_host({k: host[k][lo:hi] for k in host}, sources, copies))
        if len(pending) > 1:  # one batch's copies in flight while the next one computes
            wait(pending.pop(0))
    for event in pending:
        wait(event)
    return {"dense": host["dense"].numpy(), "summary": host["summary"].numpy(), "box": boxes,
            "finite": host["finite"].numpy()}


def make_views(images, spec, device):
    from featcache.teachers.views import make_views as views

    return views(images, spec, device=device)


def to_host(targets: dict, sources: dict, copies):
    """Copy ``sources`` (device) into ``targets`` (host); on CUDA without waiting, on ``copies``."""
    if copies is None:
        for k in targets:
            targets[k].copy_(sources[k])
        return None
    copies.wait_stream(torch.cuda.current_stream(copies.device))
    with torch.cuda.stream(copies):
        for k in targets:
            targets[k].copy_(sources[k], non_blocking=True)
            sources[k].record_stream(copies)
    return copies.record_event()


def wait(event) -> None:
    if event is not None:
        event.synchronize()


def write_shard(folder: Path, k: int, arrays: dict[str, np.ndarray]) -> int:
    """np.save each array, fsynced; two shards' files exist at a time. Returns the bytes written."""
    written = 0
    for name in ("dense", "summary", "box"):
        with open(folder / f"{k % 2}_{name}.npy", "wb") as f:
            np.save(f, arrays[name])
            f.flush()
            os.fsync(f.fileno())
        written += arrays[name].nbytes
    return written


class Pipeline:
    """Decode, compute and write threads over ``shards`` of photo paths (see the module docstring)."""

    def __init__(self, teacher, shards: list[list[Path]], decode, batch: int, out: Path, threads: int):
        self.teacher, self.shards, self.decode, self.batch, self.out = teacher, shards, decode, batch, out
        self.pool, self.prefetcher = ThreadPoolExecutor(threads), ThreadPoolExecutor(1)
        self.copies = torch.cuda.Stream(teacher.device) if teacher.device.type == "cuda" else None
        self.outbox: queue.Queue = queue.Queue(maxsize=1)
        self.seconds = dict.fromkeys(("decode_wait", "compute", "queue_wait", "write"), 0.0)
        self.written, self.ends, self.error = 0, [], None

    def _decoded(self, paths: list[Path]) -> list[torch.Tensor]:
        pin = self.copies is not None
        return list(self.pool.map(lambda p: self.decode(p).pin_memory() if pin else self.decode(p), paths))

    def _timed(self, stage: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        self.seconds[stage] += time.perf_counter() - t
        return result

    def _compute_loop(self) -> None:
        try:
            ahead = self.prefetcher.submit(self._decoded, self.shards[0])
            for k in range(len(self.shards)):
                images = self._timed("decode_wait", ahead.result)
                if k + 1 < len(self.shards):
                    ahead = self.prefetcher.submit(self._decoded, self.shards[k + 1])
                arrays = self._timed("compute", compute_shard, self.teacher, images, self.batch, self.copies)
                self._timed("queue_wait", self.outbox.put, (k, arrays))
        except BaseException as e:  # noqa: BLE001  raised by run()
            self.error = e
        self.outbox.put(None)

    def _write_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            self.written += self._timed("write", write_shard, self.out, *item)
            self.ends.append(time.perf_counter())

    def run(self) -> dict:
        threads = [threading.Thread(target=self._compute_loop), threading.Thread(target=self._write_loop)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.pool.shutdown()
        self.prefetcher.shutdown()
        if self.error is not None:
            raise self.error
        steady = sum(len(s) for s in self.shards[1:]) / (self.ends[-1] - self.ends[0])
        n = len(self.shards)
        return {"images_per_second": steady, "write_gb_per_second": self.written / self.seconds["write"] / 1e9,
                "bytes_per_image": self.written // sum(len(s) for s in self.shards),
                "seconds_per_shard": {k: round(v / n, 4) for k, v in self.seconds.items()}}


# ---- the run --------------------------------------------------------------------------------


def measure(preset, args, paths: list[Path], how: str, out: Path, roof: float) -> dict:
    teacher, flops = build_teacher(preset, args.device, args.tiny)
    bare = bare_forward(teacher, args.batch, args.reps, args.rounds)
    shards = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]
    Pipeline(teacher, shards[:2], decoder(paths), args.batch, out, args.decode_threads).run()  # warm-up
    piped = Pipeline(teacher, shards, decoder(paths), args.batch, out, args.decode_threads).run()
    del teacher
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = TINY[preset.name].get("image_size", 64) if args.tiny else preset.size
    return {"preset": preset.name, "size": size, "batch": args.batch, "bare_images_per_second": round(bare, 2),
            "gflop_per_image": round(flops / 1e9, 3), "mfu": round(bare * flops / roof, 4),
            "mfu_target": None if args.tiny else MFU_TARGETS.get(preset.name),
            "pipeline_images_per_second": round(piped["images_per_second"], 2),
            "efficiency": round(piped["images_per_second"] / bare, 4),
            "efficiency_target": None if args.tiny else PIPELINE_TARGET.get(preset.name),
            "write_gb_per_second": round(piped["write_gb_per_second"], 3), "bytes_per_image": piped["bytes_per_image"],
            "pipeline_seconds_per_shard": piped["seconds_per_shard"], "decode": how}


def run(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.checkout import use_checkout

    use_checkout()
    from benchmarks.teacher_throughput import matmul_ceiling
    from featcache.teachers.presets import PRESETS

    names = args.presets.split(",")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; presets: {', '.join(PRESETS)}")
    torch.manual_seed(0)
    if args.tiny:  # tiny forwards on a shared CPU: intra-op threads only add waiting at their barriers
        torch.set_num_threads(1)
    reps = 1 if args.tiny else 10  # of the roof's matmul
    roofs = [matmul_ceiling(args.device, reps)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, how = make_photos(Path(tmp) / "photos", args.batch * args.shards)
        for name in names:
            rows.append(measure(PRESETS[name], args, paths, how, Path(tmp), max(roofs)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    roofs.append(matmul_ceiling(args.device, reps))
    for row in rows:  # MFU against the faster of the two roof measurements
        row["mfu"] = round(row["mfu"] * roofs[0] / max(roofs), 4)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    return {"device": device, "tiny": args.tiny, "matmul_tflops": [round(r / 1e12, 2) for r in roofs],
            "matmul": "bf16 8192^3" if args.device.startswith("cuda") else "float32 2048^3",
            "weights": str(torch.bfloat16 if args.device.startswith("cuda") else torch.float32),
            "load_average": round(os.getloadavg()[0], 2), "presets": rows}


def print_table(result: dict) -> None:
    print(f"{result['device']}{' (tiny configs)' if result['tiny'] else ''}: matmul roof {result['matmul']} "
          f"{max(result['matmul_tflops'])} TFLOP/s, weights {result['weights']}, load average "
          f"{result['load_average']}")
    for r in result["presets"]:
        mfu = f"MFU {r['mfu']:.1%}" + (f" (target >= {r['mfu_target']:.0%})" if r["mfu_target"] else "")
        eff = f"efficiency {r['efficiency']:.3f}" + (f" (target >= {r['efficiency_target']})"
                                                     if r["efficiency_target"] else "")
        print(f"  {r['preset']:14s} @{r['size']}: bare {r['bare_images_per_second']:8.1f} img/s  {mfu}  pipeline "
              f"{r['pipeline_images_per_second']:8.1f} img/s  {eff}  write {r['write_gb_per_second']:.2f} GB/s "
              f"({r['bytes_per_image'] / 1e6:.3f} MB/img)")
        print(f"    per shard: {r['pipeline_seconds_per_shard']}  decode: {r['decode']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="dinov3-7b,siglip2-g-384,sam3")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="scaled-down configs: a smoke test of the script")
    ap.add_argument("--batch", type=int, default=None, help="images per batch and per shard (32; 4 with --tiny)")
    ap.add_argument("--shards", type=int, default=None, help="shards through the pipeline (8; 3 with --tiny)")
    ap.add_argument("--reps", type=int, default=5, help="batches per timed round of the bare forward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.tiny else 32)
    args.shards = args.shards or (3 if args.tiny else 8)
    if args.shards < 2:
        ap.error("--shards: at least 2 (the first one is the warm-up of the steady state)")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
