"""The cheap-teacher pipeline (issue 13): ShardWorker steady state vs the plain loop vs the bare forward.

    PYTHONPATH=. python benchmarks/extract_pipeline.py [--images 256] [--batch 32] [--width 1024] [--json]

A DINOv3 with no transformer blocks (patch embedding + final norm: C = ``--width`` at 224, stored as
f16), saved with random weights and loaded through featcache's real path, so cheap that what runs
around it decides the rate. Same photos (``--images`` copies of the scikit-image photos), same
model, batch = shard size, CPU float32, one process, measured in one run; rounds interleave the
passes and medians are reported:

- bare forward: ``teacher.model`` on views already decoded, resized and normalized;
- plain loop: what a user would write without featcache's worker, one shard after the other: read
  and decode each photo, ``make_views``, ``teacher.extract``, ``.numpy().astype(float16)``,
  ``np.save`` of dense and summary;
- worker: ``ShardWorker.process`` over the shards in order, naming the next one as the Ray driver
  does, overlapped (``write_queue=1``: compute thread, writer thread, look-ahead) and sequential
  (``write_queue=0``), writing a real cache. Steady state = images / the records' ``total``
  seconds, first shard left out (as the other passes leave out their first batch).

Targets: worker / plain loop >= 1.3 (decode and writes overlap the forward); worker / bare forward
is reported (0.27 before the overlap). Per-shard stage seconds of the worker (decode wait, views,
forward, encode, device->host, compute, queue wait, write, overlapped, total) are the records' means.
The machine's load average is printed: on a shared machine it decides much of the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.extract_efficiency import make_photos

CHEAP = dict(num_hidden_layers=0, num_attention_heads=16, use_gated_mlp=True, hidden_act="silu",
             num_register_tokens=4, patch_size=16, image_size=224)


def shards_of(paths: list[Path], size: int) -> list[list[Path]]:
    return [paths[i:i + size] for i in range(0, len(paths), size)]


def bare_forward(teacher, paths: list[Path], batch: int) -> float:
    """images/s of the transformers model alone on pre-made views (first batch left out)."""
    from featcache.decode import decode
    from featcache.teachers.views import make_views

    batches = [make_views([decode(p.read_bytes(), str(p)) for p in group], teacher.spec)[0]
               for group in shards_of(paths, batch)]
    with torch.inference_mode():
        teacher.model(pixel_values=batches[0])
        t0 = time.perf_counter()
        for pixels in batches[1:]:
            teacher.model(pixel_values=pixels)
        return sum(len(p) for p in batches[1:]) / (time.perf_counter() - t0)


def plain_loop(teacher, paths: list[Path], batch: int, out: Path) -> float:
    """images/s of the sequential loop a user would write (first shard left out)."""
    from featcache.decode import decode
    from featcache.teachers.views import make_views

    out.mkdir(parents=True, exist_ok=True)
    t0, done = 0.0, 0
    for k, group in enumerate(shards_of(paths, batch)):
        if k == 1:
            t0 = time.perf_counter()
        images = [decode(p.read_bytes(), str(p)) for p in group]
        pixels, _ = make_views(images, teacher.spec)
        features = teacher.extract(pixels)
        np.save(out / f"{k}_dense.npy", features.dense.numpy().astype(np.float16))
        np.save(out / f"{k}_summary.npy", features.summary.numpy().astype(np.float16))
        done += len(group) if k else 0
    return done / (time.perf_counter() - t0)


def worker_pass(base: Path, out: Path, model: str, batch: int, write_queue: int) -> tuple[float, list[dict]]:
    """(steady-state images/s, records) of a ShardWorker writing a fresh cache of ``base``'s images."""
    from featcache.extract.config import from_dict
    from featcache.extract.plan import prepare
    from featcache.extract.worker import ShardWorker

    plan = prepare(from_dict({"source": str(base), "output": str(out), "shard_size": batch, "batch_size": batch,
                              "stats": False, "teachers": [{"family": "dinov3", "source": model}]}))
    worker = ShardWorker(str(out), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views],
                         batch_size=batch, write_queue=write_queue)
    shards = sorted(plan.todo)
    try:
        records = [worker.process(s, prefetch=n) for s, n in zip(shards, shards[1:] + [None])]
    finally:
        worker.close()
    steady = records[1:]
    return sum(r["images"] for r in steady) / sum(r["seconds"]["total"] for r in steady), records


def mean_seconds(records: list[dict]) -> dict[str, float]:
    steady = records[1:]
    return {k: round(statistics.mean(r["seconds"][k] for r in steady), 4) for k in steady[0]["seconds"]}


def run(args) -> dict:
    import featcache
    from featcache.teachers import create_teacher
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.set_num_threads(os.cpu_count())
    load = [os.getloadavg()[0]]
    rates: dict[str, list[float]] = {"bare_forward": [], "plain_loop": [], "worker_overlapped": [],
                                     "worker_sequential": []}
    breakdown: dict[str, list[dict]] = {"worker_overlapped": [], "worker_sequential": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = DINOv3ViTConfig(**CHEAP, hidden_size=args.width, intermediate_size=4 * args.width)
        DINOv3ViTModel(cfg).save_pretrained(tmp / "model")
        paths = make_photos(tmp / "photos", args.images)
        featcache.index(str(tmp / "photos"), str(tmp / "base"))
        teacher = create_teacher("dinov3", str(tmp / "model"))
        for r in range(args.rounds):
            rates["bare_forward"].append(bare_forward(teacher, paths, args.batch))
            rates["plain_loop"].append(plain_loop(teacher, paths, args.batch, tmp / f"plain{r}"))
            for name, queue in (("worker_overlapped", 1), ("worker_sequential", 0)):
                rate, records = worker_pass(tmp / "base", tmp / f"{name}{r}", str(tmp / "model"), args.batch, queue)
                rates[name].append(rate)
                breakdown[name].append(mean_seconds(records))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
                  file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    med = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    worker = med["worker_overlapped"]
    return {"config": {"images": args.images, "batch": args.batch, "width": args.width, "size": 224,
                       "codec": "f16", "rounds": args.rounds, "cpus": os.cpu_count(), "torch_threads": os.cpu_count()},
            "load_average": {"start": round(load[0], 2), "end": round(load[1], 2)},
            "images_per_second": med, "all_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
            "ratios": {"worker_over_plain": round(worker / med["plain_loop"], 3),
                       "worker_over_bare": round(worker / med["bare_forward"], 3),
                       "sequential_worker_over_plain": round(med["worker_sequential"] / med["plain_loop"], 3),
                       "overlapped_over_sequential": round(worker / med["worker_sequential"], 3)},
            "worker_seconds_per_shard": {k: v[len(v) // 2] for k, v in breakdown.items()}}


def print_table(result: dict) -> None:
    c, r, q = result["config"], result["images_per_second"], result["ratios"]
    print(f"{c['images']} photos, DINOv3 with 0 blocks, C = {c['width']} @224, f16, batch = shard = {c['batch']}, "
          f"CPU float32, {c['cpus']} cores; load average {result['load_average']['start']} -> "
          f"{result['load_average']['end']}; median of {c['rounds']} rounds")
    for name, rate in r.items():
        print(f"  {name:18s} {rate:8.1f} images/s   rounds {result['all_rounds'][name]}")
    print(f"  worker / plain loop {q['worker_over_plain']:.3f} (target >= 1.3)   worker / bare forward "
          f"{q['worker_over_bare']:.3f}   overlapped / sequential worker {q['overlapped_over_sequential']:.3f}")
    for name, seconds in result["worker_seconds_per_shard"].items():
        print(f"  {name} seconds per shard: " + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per batch and per shard")
    ap.add_argument("--width", type=int, default=1024, help="channels C of the cheap teacher")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
