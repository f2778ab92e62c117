"""Data-parallel scaling of the student's train step: samples/s per world size and the efficiency
(DESIGN.md §5, "Training at scale").

    python benchmarks/ddp_scaling.py [--device cuda] [--batch 32] [--steps 20] [--json]  # world 1..min(GPUs, 8)
    python benchmarks/ddp_scaling.py --device cpu --scale tiny --steps 2                  # gloo, 2 processes, seconds

N processes start as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and join
through ``featcache.train.distributed.join``: NCCL on GPUs (one process per GPU), gloo on the CPU. For each
world size k = 1..N the first k ranks wrap a fresh student in ``DistributedDataParallel`` over a group of k
ranks and run train_cost.py's student step (forward, bf16 autocast on CUDA; spatial MSE and angle loss against
synthetic targets; backward with DDP's all-reduce; clipping; AdamW) on ``--batch`` images each (weak scaling:
the global batch is k x batch); the other ranks wait. samples/s(k) = k x batch x steps / the slowest rank's
seconds; efficiency(k) = samples/s(k) / (k x samples/s(1)). Rank 0 first runs the same step on the bare
student: DDP's overhead at world size 1 = 1 - samples/s(1) / samples/s(bare). No cache and no zarr.

The student and its resolution are train_cost.py's: ViT-B/16 at 448 px with heads for the report's three
teachers (``--scale full``, the default on CUDA) or the "micro" student at 112 px (``--scale tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import python_command, use_checkout  # noqa: E402

use_checkout()

from benchmarks.train_cost import SETTINGS, student_step  # noqa: E402
from featcache.train.distributed import join, local_device  # noqa: E402
from featcache.train.student import Student, StudentConfig  # noqa: E402


def default_world(device: str) -> int:
    """Every GPU up to 8 on CUDA; two gloo processes on the CPU."""
    return min(torch.cuda.device_count(), 8) if device.startswith("cuda") else 2


def scaling(device: str, scale: str, batch: int, warmup: int, steps: int, world: int | None = None) -> dict:
    """Start ``world`` worker processes, wait for them (one failing stops the others) and return the figures."""
    n = world or default_world(device)
    if n < 1:
        raise RuntimeError(f"no {device} device to run data-parallel processes on")
    setting = SETTINGS[scale]()  # here, once: the workers get the student's config and need no teacher classes
    with tempfile.TemporaryDirectory() as tmp:
        out, port = Path(tmp) / "result.json", free_port()
        cmd = python_command(__file__, "--worker", str(out), "--device", device, "--scale", scale, "--batch",
                             str(batch), "--warmup", str(warmup), "--steps", str(steps), "--student",
                             json.dumps(setting.student.to_dict()), "--resolution", str(setting.resolution))
        logs, procs = [Path(tmp) / f"rank{r}.log" for r in range(n)], []
        try:
            for r, log in enumerate(logs):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
                with log.open("w") as f:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f))
            wait_all(procs, logs)
        finally:
            stop(procs)
        return json.loads(out.read_text())


def free_port() -> int:
    """A TCP port free on the loopback now, for the group's rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every rank; the first one to fail kills the others (they would wait for it until the group's
    timeout) and its last log line is raised."""
    failed = []
    while not failed and any(p.poll() is None for p in procs):
        time.sleep(0.05)
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    failed = failed or [r for r, p in enumerate(procs) if p.returncode != 0]
    stop(procs)
    if failed:
        lines = [line for line in logs[failed[0]].read_text().splitlines() if line.strip()]
        raise RuntimeError(f"rank {failed[0]} of {len(procs)} failed: {lines[-1] if lines else 'no output'}")


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill the ranks still running (after one failed, or when this process stops early)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- one rank -----------------------------------------------------------------------------------


def batch_of(cfg: StudentConfig, side: int, batch: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Random images and synthetic targets (dense, Ω, summary) per teacher head, on the student's grid."""
    h = w = side // cfg.patch
    targets = {head.name: (torch.randn(batch, h, w, head.dense_channels, device=device),
                           torch.ones(batch, h, w, dtype=torch.bool, device=device),
                           torch.randn(batch, max(head.summary_channels, 1), device=device))
               for head in cfg.heads}
    return torch.randn(batch, 3, side, side, device=device), targets


def samples_per_s(model: torch.nn.Module, data: tuple, warmup: int, steps: int) -> float:
    """This rank's samples/s of the train step after ``warmup`` steps (each step ends synchronized)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(warmup):
        student_step(model, optimizer, *data)
    t0 = time.perf_counter()
    for _ in range(steps):
        student_step(model, optimizer, *data)
    return len(data[0]) * steps / (time.perf_counter() - t0)


def student(cfg: StudentConfig, device: torch.device) -> Student:
    """A fresh student in training mode, the same weights on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(0)
    return Student(cfg).to(device).train()


def worker(args) -> None:
    """One rank: the bare step (rank 0), then every world size in turn; rank 0 writes the figures."""
    device = torch.device(args.device)
    ranks = join(device)
    if not dist.is_initialized():  # one process: join starts no group, DDP still needs one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    device = local_device(device, ranks.local)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.world))
    cfg = StudentConfig.from_dict(json.loads(args.student))
    torch.manual_seed(1 + ranks.rank)
    data = batch_of(cfg, args.resolution, args.batch, device)
    bare = samples_per_s(student(cfg, device), data, args.warmup, args.steps) if ranks.rank == 0 else 0.0
    worlds = {}
    for k in range(1, ranks.world + 1):
        group = dist.new_group(list(range(k)))  # every rank makes every group, in the same order
        rate = 0.0
        if ranks.rank < k:
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(student(cfg, device), device_ids=ids,
                                                              process_group=group)
            rate = samples_per_s(model, data, args.warmup, args.steps)
            del model
        worlds[k] = slowest(rate, k, device)
    if ranks.rank == 0:
        Path(args.worker).write_text(json.dumps(figures(args, cfg, bare, worlds, dist.get_backend())))
    dist.destroy_process_group()


def slowest(rate: float, k: int, device: torch.device) -> float:
    """The group's samples/s: k x batch x steps over the slowest member's seconds (every rank calls it)."""
    t = torch.tensor([1 / rate if rate else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return k / t.item()


def figures(args, cfg: StudentConfig, bare: float, worlds: dict[int, float], backend: str) -> dict:
    """The run's record: setting, bare samples/s, DDP's overhead at world size 1, samples/s and efficiency per k."""
    one = worlds[1]
    vit = cfg.vit()
    return {"device": args.device, "backend": backend, "scale": args.scale, "batch_per_rank": args.batch,
            "warmup": args.warmup, "steps": args.steps, "resolution": args.resolution,
            "student": {"width": vit.width, "depth": vit.depth, "heads": [h.name for h in cfg.heads]},
            "bare_samples_per_s": bare, "ddp_overhead_world_1": 1 - one / bare,
            "world_sizes": {str(k): {"samples_per_s": r, "efficiency": r / (k * one)} for k, r in worlds.items()}}


def show(f: dict) -> None:
    print(f"DDP ({f['backend']}) on {f['device']}, {f['scale']} student {f['student']['width']} wide x "
          f"{f['student']['depth']} at {f['resolution']} px, batch {f['batch_per_rank']} per rank, {f['steps']} steps")
    print(f"  bare step (no DDP): {f['bare_samples_per_s']:.1f} samples/s; DDP overhead at world size 1: "
          f"{f['ddp_overhead_world_1']:.1%}")
    for k, r in f["world_sizes"].items():
        print(f"  world {k}: {r['samples_per_s']:9.1f} samples/s  efficiency {r['efficiency']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--scale", choices=tuple(SETTINGS), default=None, help="full on CUDA, tiny on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="images per rank (32 on CUDA, 2 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--world", type=int, default=None, help="largest world size (every GPU up to 8; 2 on the CPU)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a rank's process: where rank 0 writes the figures
    ap.add_argument("--student", help=argparse.SUPPRESS)  # the worker's StudentConfig as JSON
    ap.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.scale = args.scale or ("full" if cuda else "tiny")
    args.batch = args.batch or (32 if cuda else 2)
    if args.worker:
        return worker(args)
    f = scaling(args.device, args.scale, args.batch, args.warmup, args.steps, args.world)
    if args.json:
        print(json.dumps(f))
    else:
        show(f)


if __name__ == "__main__":
    main()
