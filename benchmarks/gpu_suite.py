"""Every GPU figure of the project in one run, within a time budget: one JSON file and a table.

    python benchmarks/gpu_suite.py [--out gpu_suite.json] [--stages train_cost,ddp] [--budget-s 540]  # a GPU
    python benchmarks/gpu_suite.py --dry-run          # every stage at toy sizes on the CPU (under a minute)
    python benchmarks/gpu_suite.py --dry-run --device cuda   # the same toy sizes on a GPU: the GPU paths, fast
    python benchmarks/gpu_suite.py --requirements     # the wheels a bare GPU machine needs besides torch, transformers

Run from the repository root of a checkout that need not be installed, with no zarr, Ray or s3fs
(benchmarks/checkout.py), as on a lent GPU machine; random weights, nothing downloaded. The stages, each the
functions of the benchmark script named, at that script's GPU setting (full-size models, bf16):

| stage | script | figures |
|---|---|---|
| teacher_mfu | teacher_throughput.py | ``Teacher.extract`` images/s and MFU per preset (weights in bf16, batch 32) |
| gpu_extract | gpu_extract.py | bare forward MFU, extract pipeline efficiency, write GB/s per preset |
| train_cost | train_cost.py | cache vs online student step at the report's setting (ViT-B@448, batch 32) |
| ddp | ddp_scaling.py | the train step under DDP: samples/s per world size 1..min(GPUs, 8), efficiency, DDP overhead |
| featsharp | featsharp.py | FeatSharp 3x of SigLIP2-g on a 1152 px canvas against its 10 forwards (batch 8) |
| roofline | roofline_validation.py | predicted / measured forward time, students and the three teachers |
| vitdet | vitdet.py | ViT-B forward with ViTDet windows 8 and 16 against global attention, 512-2048 px |
| codec_decode | (here) | int4-pca's ``decode_torch`` of a batch of DINOv3-7B@448 windows to PHI-S on the device, against the host's decoding and f16's PHI-S transform |

Each stage runs in a process of its own (this script again, the way it was started), so a crash, an
out-of-memory or a hang costs that stage only and its GPU memory is back before the next one starts. A
stage may use a share of the budget left, in proportion to its weight among the stages still to run; past it,
its processes are killed. A stage that fails or overruns is recorded with its error's last line and the
suite goes on; the JSON file is rewritten after every stage (a killed suite keeps what finished), each
stage's full log is kept beside it (``gpu_suite.logs/``). Exit status 1 when any stage failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # the budget counts from here: the suite's own start-up is in it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import ROOT, python_command, use_checkout  # noqa: E402

#: what a bare machine with torch and transformers lacks for this suite (pip names), found by tracing the
#: modules a dry run imports in all its processes (tests/test_gpu_suite.py keeps it true)
REQUIREMENTS = ("pillow",)
TEACHERS = ("siglip2-g-384", "dinov3-7b", "sam3")


@dataclass(frozen=True)
class Stage:
    """One stage: ``run(options) -> figures``, its weight in the budget, and its headline for the table."""

    run: Callable[[argparse.Namespace], dict]
    weight: float
    headline: Callable[[dict], str]


def pick(o: argparse.Namespace, full, dry):
    """The GPU setting, or the toy one in a dry run."""
    return dry if o.dry_run else full


# ---- the stages (each runs in its own process) ---------------------------------------------------------


def teacher_mfu(o) -> dict:
    """teacher_throughput.py --mfu: images/s of ``Teacher.extract`` per preset, MFU against a bf16 8192^3
    matmul measured just before it; weights made in bf16 on the device (gpu_extract.build_teacher)."""
    from benchmarks.gpu_extract import build_teacher
    from benchmarks.teacher_throughput import matmul_ceiling, mfu_row
    from featcache.teachers.presets import PRESETS

    rows = {}
    for name in TEACHERS:
        teacher, flops = build_teacher(PRESETS[name], o.device, tiny=o.dry_run)
        roof = matmul_ceiling(o.device, reps=pick(o, 10, 1))
        rows[name] = mfu_row(teacher, flops, *pick(o, (32, 3, 5), (2, 1, 1)), o.device, roof)
        del teacher
        free(o.device)
    return {"presets": rows}


def gpu_extract(o) -> dict:
    """gpu_extract.py: bare forward, MFU and the extract pipeline (decode, views, forward, write) per preset."""
    from benchmarks.gpu_extract import run

    sizes = pick(o, dict(batch=32, shards=8, reps=5, rounds=3, decode_threads=8),
                 dict(batch=2, shards=2, reps=1, rounds=1, decode_threads=2))
    return run(argparse.Namespace(presets=",".join(TEACHERS), device=o.device, tiny=o.dry_run, **sizes))


def train_cost(o) -> dict:
    """train_cost.py: the cache step against the online step (teachers run per batch) at the report's setting."""
    import torch

    from benchmarks import train_cost as tc

    args = argparse.Namespace(device=o.device, scale=pick(o, "full", "tiny"), batch=pick(o, 32, 2),
                              rounds=pick(o, 5, 1))
    setting = tc.SETTINGS[args.scale]()
    return tc.summarize(setting, args, tc.measure(tc.Steps(setting, torch.device(o.device)), args))


def ddp(o) -> dict:
    """ddp_scaling.py: the student step under DistributedDataParallel per world size, and without DDP."""
    from benchmarks.ddp_scaling import scaling

    return scaling(o.device, pick(o, "full", "tiny"), batch=pick(o, 32, 2), warmup=pick(o, 3, 1),
                   steps=pick(o, 20, 2))


def featsharp(o) -> dict:
    """featsharp.py --full: FeatSharp 3x of SigLIP2-g at 1152 px against its ten bare forwards."""
    from benchmarks.featsharp import inference, upsampler
    from benchmarks.gpu_extract import build_teacher
    from featcache.teachers.presets import PRESETS

    teacher, _ = build_teacher(PRESETS["siglip2-g-384"], o.device, tiny=o.dry_run)
    model = upsampler(teacher.spec, o.device, heads=pick(o, 16, 2))
    return inference(teacher, model, batch=pick(o, 8, 1), rounds=pick(o, 3, 1), device=o.device)


def roofline(o) -> dict:
    """roofline_validation.py --teachers: predicted against measured forward time of students and teachers."""
    from benchmarks.roofline_validation import STUDENTS, validate

    args = argparse.Namespace(device=o.device, batch=pick(o, 8, 2), res=pick(o, 224, 64), teachers=not o.dry_run)
    return validate(args, pick(o, STUDENTS, ("micro",)), seconds=pick(o, 3.0, 0.2))


def vitdet(o) -> dict:
    """vitdet.py: a ViT-B forward with ViTDet windows of 8 and 16 tokens against global attention."""
    from benchmarks.vitdet import measure

    args = argparse.Namespace(device=o.device, size_name=pick(o, "base", "micro"), depth=None,
                              global_blocks=pick(o, None, [1]), batch=1, repeat=pick(o, 3, 1))
    sides = o.vitdet_sizes or pick(o, (512, 1024, 2048), (256,))
    return {"size_name": args.size_name, "batch": 1, "rows": [measure(args, side) for side in sides]}


def codec_decode(o) -> dict:
    """int4-pca on the training device: a batch of 32 windows of 32 x 32 tokens of C = 4096 (the DINOv3-7B@448
    view) decoded to PHI-S floats by ``decode_torch``, timed against f16's PHI-S transform of the same tokens
    (what the device does for an f16 view), and checked against the host's numpy decoding. The codec is fitted
    (``Int4Pca.fit``) to synthetic low-rank t(4) features, as benchmarks/codec_loader.py's."""
    import numpy as np
    import torch

    from featcache.stats import Moments, PhiS
    from featcache.store.codec import Int4Pca

    c, rank, side, batch = pick(o, (4096, 64, 32, 32), (64, 8, 8, 2))
    rng = np.random.default_rng(0)
    tokens = (rng.standard_t(4, (20_000, rank)) @ rng.standard_normal((rank, c)) * 3
              + rng.standard_normal((20_000, c)) * np.geomspace(0.1, 2, c)).astype(np.float32)
    phis = PhiS.fit(Moments.of(tokens))
    arrays = {"mean": phis.mean, "rotation": phis.rotation.astype(np.float32)}
    extra, q = Int4Pca.fit(tokens, arrays, phis)
    codec = Int4Pca.from_fitted({**arrays, **extra}, q)
    stored = torch.from_numpy(codec.encode_numpy(tokens[rng.integers(0, len(tokens), batch * side * side)]))
    stored = stored.reshape(batch, side, side, -1).to(o.device)
    halves = torch.from_numpy(tokens[:batch * side * side].astype(np.float16)).reshape(batch, side, side, c).to(o.device)
    mean, rotation = (torch.as_tensor(a, dtype=torch.float32, device=o.device) for a in (phis.mean, arrays["rotation"]))
    runs = {"int4_pca_decode": lambda: codec.decode_torch(stored, "phis"),
            "f16_phis_transform": lambda: (halves.float() - mean) @ rotation.T}
    seconds = {}
    for name, fn in runs.items():
        fn()
        reps = pick(o, 20, 2)
        if o.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if o.device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - t0) / reps
    host = codec.decode(stored[:1].cpu().numpy(), "phis")
    device = codec.decode_torch(stored[:1], "phis").cpu().numpy()
    return {"channels": c, "kept": q["kept"], "windows": [batch, side, side], "relative_mse_fit": q["relative_mse"],
            "ms_per_batch": {k: v * 1e3 for k, v in seconds.items()},
            "ratio_decode_to_f16_transform": seconds["int4_pca_decode"] / seconds["f16_phis_transform"],
            "max_abs_device_vs_host": float(np.abs(device - host).max()), "host_max_abs": float(np.abs(host).max())}


def free(device: str) -> None:
    """Hand the cached blocks of a model just dropped back, before the next one is built."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---- headlines -------------------------------------------------------------------------------------------


def _mfu_line(f: dict) -> str:
    return ", ".join(f"{k} MFU {r['mfu']:.1%}" for k, r in f["presets"].items())


def _extract_line(f: dict) -> str:
    return ", ".join(f"{r['preset']} MFU {r['mfu']:.1%} pipeline {r['efficiency']:.2f} "
                     f"{r['write_gb_per_second']:.2f} GB/s" for r in f["presets"])


def _train_line(f: dict) -> str:
    s = f["seconds"]
    return (f"cache step {s['cache_step_s'] * 1e3:.0f} ms, online {s['online_step_s'] * 1e3:.0f} ms, "
            f"ratio {f['ratio']:.1f} of bound {f['bound_run']:.1f}")


def _ddp_line(f: dict) -> str:
    worlds = ", ".join(f"{k}: {r['samples_per_s']:.0f}/s eff {r['efficiency']:.2f}"
                       for k, r in f["world_sizes"].items())
    return f"bare {f['bare_samples_per_s']:.0f}/s, DDP overhead {f['ddp_overhead_world_1']:.1%}; {worlds}"


def _featsharp_line(f: dict) -> str:
    ms = f["ms_per_image"]
    return (f"{f['canvas']} px: {ms['featsharp']:.1f} ms/img vs floor {ms['floor']:.1f} "
            f"(x{f['ratio_featsharp_to_floor']:.2f})")


def _roofline_line(f: dict) -> str:
    return ", ".join(f"{r['model']} {r['ratio']:.2f}" for r in f["models"]) + " (predicted / measured)"


def _codec_line(f: dict) -> str:
    ms = f["ms_per_batch"]
    return (f"int4-pca decode {ms['int4_pca_decode']:.2f} ms/batch, f16 PHI-S {ms['f16_phis_transform']:.2f} ms "
            f"(x{f['ratio_decode_to_f16_transform']:.2f}); device vs host {f['max_abs_device_vs_host']:.1e}")


def _vitdet_line(f: dict) -> str:
    return ", ".join(f"{r['px']} px w8 x{r['w8_ratio']:.2f} w16 x{r['w16_ratio']:.2f}" for r in f["rows"])


STAGES = {
    "teacher_mfu": Stage(teacher_mfu, 1.0, _mfu_line),
    "gpu_extract": Stage(gpu_extract, 1.5, _extract_line),
    "train_cost": Stage(train_cost, 1.0, _train_line),
    "ddp": Stage(ddp, 1.0, _ddp_line),
    "featsharp": Stage(featsharp, 0.6, _featsharp_line),
    "roofline": Stage(roofline, 1.0, _roofline_line),
    "vitdet": Stage(vitdet, 0.6, _vitdet_line),
    "codec_decode": Stage(codec_decode, 0.2, _codec_line),
}


# ---- the suite (the parent process) ----------------------------------------------------------------------


def run_stage(o) -> None:
    """In a stage's process: run it and write its figures to ``--stage-out``."""
    use_checkout()
    import torch

    if o.dry_run and o.device == "cpu":
        torch.set_num_threads(1)  # toy sizes: a second thread only waits at the barriers
    torch.manual_seed(0)
    Path(o.stage_out).write_text(json.dumps(STAGES[o.stage].run(o)))


def in_child(name: str, share: float, logs: Path) -> dict:
    """Run stage ``name`` in its own process for at most ``share`` seconds; its record for the JSON file."""
    out, log = logs / f"{name}.json", logs / f"{name}.log"
    out.unlink(missing_ok=True)
    cmd = python_command(__file__, *sys.argv[1:], "--stage", name, "--stage-out", str(out))
    t0 = time.monotonic()
    with log.open("w") as f:
        code = wait(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, process_group=0), share)
    seconds = round(time.monotonic() - t0, 2)
    figures, error = {}, None
    if code is None:
        error = f"ran past its share of the budget ({share:.0f} s) and was stopped"
    elif code != 0:
        error = last_line(log) or f"exited with status {code}"
    else:
        figures = json.loads(out.read_text())
        error = check(name, figures)
    return {"ok": error is None, "seconds": seconds, "figures": clean(figures), "error": error}


def wait(proc: subprocess.Popen, seconds: float) -> int | None:
    """``proc``'s exit status, or None when it ran past ``seconds``. Past them, or when this process is told
    to stop (SIGTERM, Ctrl-C), its process group (the stage and the DDP ranks it started) is killed."""
    try:
        return proc.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def last_line(log: Path) -> str:
    """The log's last non-blank line: a traceback's ends with the exception and its message."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def numbers(x, path: str = ""):
    """(path, value) of every number in nested dicts and lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def check(name: str, figures: dict) -> str | None:
    """Why the figures are no result (a NaN or infinity, nothing measured, no headline), else None."""
    bad = [p for p, v in numbers(figures) if not math.isfinite(v)]
    if bad:
        return f"non-finite figures: {', '.join(bad[:5])}"
    try:
        headline = STAGES[name].headline(figures)
    except (KeyError, IndexError, TypeError) as e:
        return f"no headline figure ({type(e).__name__}: {e})"
    if not headline or not any(v > 0 for _, v in numbers(figures)):
        return "the stage measured nothing"
    return None


def clean(x):
    """``x`` with non-finite numbers as None (the JSON file stays standard JSON)."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def device_name(device: str) -> str:
    """What ran the figures, for the JSON file's ``device``."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def write(report: dict, path: Path) -> None:
    """Replace ``path`` with ``report`` at once: a kill mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def row(name: str, rec: dict) -> str:
    """A stage's table row: name, ok, seconds and its headline figures (or its error)."""
    head = rec["error"] if not rec["ok"] else STAGES[name].headline(rec["figures"])
    return f"{name:12s} {'yes' if rec['ok'] else 'NO':3s} {rec['seconds']:8.1f}  {head}"


def suite(o) -> dict:
    """Run the stages in order, each within its share of what is left of the budget."""
    import torch

    report = {"device": device_name(o.device), "torch": torch.__version__,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": o.dry_run, "budget_s": o.budget_s, "stages": {}}
    logs = o.out.with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{report['device']}, torch {report['torch']}{', dry run (toy sizes)' if o.dry_run else ''}, "
          f"budget {o.budget_s:.0f} s")
    print(f"{'stage':12s} {'ok':3s} {'seconds':>8s}  headline", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped suite stops its running stage too
    for i, name in enumerate(o.stages):
        left = o.budget_s - (time.monotonic() - STARTED)
        share = left * STAGES[name].weight / sum(STAGES[n].weight for n in o.stages[i:])
        report["stages"][name] = in_child(name, share, logs)
        write(report, o.out)
        print(row(name, report["stages"][name]), flush=True)
    print(f"figures: {o.out}; logs: {logs}")
    return report


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cuda (cpu with --dry-run)")
    ap.add_argument("--out", type=Path, default=Path("gpu_suite.json"),
                    help="the JSON file (each stage's log goes to OUT.logs/, beside it)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of: {', '.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole suite (540)")
    ap.add_argument("--dry-run", action="store_true", help="every stage at toy sizes (a smoke test)")
    ap.add_argument("--requirements", action="store_true",
                    help="print the pip wheels this suite needs beyond torch and transformers, and exit")
    ap.add_argument("--vitdet-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="vitdet: input sides in px, comma list (512,1024,2048; 256 with --dry-run)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # in a stage's own process: which one
    ap.add_argument("--stage-out", help=argparse.SUPPRESS)
    o = ap.parse_args(argv)
    o.device = o.device or ("cpu" if o.dry_run else "cuda")
    o.out = o.out.resolve()  # the stage processes run in the repository root
    o.stages = list(dict.fromkeys(s.strip() for s in o.stages.split(",") if s.strip()))
    return o


def refuse(message: str) -> None:
    print(f"gpu_suite.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    o = parse(sys.argv[1:])
    if o.requirements:
        print("\n".join(REQUIREMENTS))
        return
    if o.stage:
        return run_stage(o)
    unknown = [s for s in o.stages if s not in STAGES]
    if unknown or not o.stages:
        refuse(f"unknown stages {', '.join(unknown) or '(none given)'}; stages: {', '.join(STAGES)}")
    if not o.budget_s > 0:
        refuse(f"--budget-s must be positive, not {o.budget_s}")
    import torch

    if o.device == "cuda" and not torch.cuda.is_available():
        refuse(f"--device cuda but torch {torch.__version__} sees no GPU here; on a CPU: --dry-run --device cpu")
    report = suite(o)
    raise SystemExit(0 if all(r["ok"] for r in report["stages"].values()) else 1)


if __name__ == "__main__":
    main()
