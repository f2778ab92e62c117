"""Step cost of distilling from the cache against the same step with the teachers run online (issue 12).

    PYTHONPATH=. python benchmarks/train_cost.py [--batch 2] [--rounds 5] [--count-flops] [--json]  # CPU, scaled
    PYTHONPATH=. python benchmarks/train_cost.py --device cuda [--batch 32] [--json]                # GPU, full size
    PYTHONPATH=. python benchmarks/train_cost.py --scale tiny --rounds 1   # smoke test (gpu_suite --dry-run), seconds

Same student, batch, resolution and device for both steps, measured in one run (rounds interleave the
two, the order alternating; medians):

- cache step: a batch already collated as ``train.data.collate`` makes it (each teacher's window of
  the crop, its map into the window, extent, Ω, cached summary), then what ``Trainer`` does per step:
  student forward (bf16 autocast on CUDA), ``lookup_targets`` per teacher, spatial MSE over Ω and
  the balanced summary angle loss, backward, gradient clipping, AdamW step;
- online step: each teacher's forward (``Teacher.extract``, no grad) on the same crop at the
  teacher's input size, its dense map resampled onto the student grid by the same ``lookup_targets``
  (a pure scale), then the same student step. Teacher inputs are made before timing, as a loader
  would hand them over; neither step reads or decodes anything (benchmarks/train_loader.py does).

Analytic bound: a student step costs 3x its forward FLOPs (forward + backward, the convention of
DESIGN.md §5: "ViT-B at 448 px costs about 0.5 TFLOP per image"); teachers cost their forward at
their views' input sizes (featcache.roofline). R = (F_teachers + F_step) / F_step is the speedup
the cache can give at most; fraction = (t_online / t_cache) / R (target >= 0.8).

The report's setting: a ViT-B/16 student at 448 px (heads for all three teachers) and the report's
teacher views: SigLIP2-g at 384 (its global view; FeatSharp's 3x3 tiles at 384, nine more forwards,
are left out of R and shown separately), DINOv3-7B at 448 (the student's resolution: its 28x28 grid
matches the student's) and SAM3 at 1008. SAM3 is a dense-only target (no summary head), as in
C-RADIO. On CUDA the script runs exactly these (random weights, bf16 autocast). On CPU every model
is scaled alike: widths and attention heads / 4 (head size kept), image sides / 2 (so tokens / 4,
windows too), layers kept; every FLOP term (T·D², T²·D, T·W·D, the adaptor heads) of every model
then shrinks by the same factor, 64, and the scaled teacher:student ratio matches the report's
within a few percent (printed; only the patch embeddings and prefix tokens do not scale). Halving
the layers as well would leave the student's adaptor heads unscaled and miss the ratio by ~10%.

``--count-flops`` also counts every FLOP figure with ``FlopCounterMode`` on the meta device. On CPU
torch runs one thread by default (``--threads``): on the shared 2-core machine two threads stall each
other whenever another process runs.

Teachers are the real transformers classes built by ``Preset.random_teacher``. It runs on a GPU
machine with no zarr from a checkout that is not installed (``benchmarks/checkout.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import use_checkout  # noqa: E402

use_checkout()

from featcache.geometry import CropConfig, cell_map, lookup_targets, omega, sample_crop, window_for  # noqa: E402

#: the crops BENCHMARKS.md's figures were measured with: half of them free (interpolated lookups) and half
#: mirrored, the defaults before issue 25 (the heavier lookup mix; today's defaults align every crop)
CROPS = CropConfig(aligned_prob=0.5, flip_prob=0.5)
from featcache.teachers.presets import PRESETS, Preset, model_classes  # noqa: E402
from featcache.train.losses import angle_loss, spatial_mse  # noqa: E402
from featcache.train.student import Student, StudentConfig, TeacherHead  # noqa: E402

#: the report's teacher views: (preset, input size); SigLIP2's FeatSharp tiles are reported apart
REPORT_VIEWS = (("siglip2-g-384", 384), ("dinov3-7b", 448), ("sam3", 1008))
REPORT_RESOLUTION = 448
DENSE_ONLY = {"sam3"}  # teachers the student learns without a summary head
DISPERSION = 0.5  # any positive constant: the loss's cost does not depend on it
#: CPU scaling of every model: (width and heads divisor, layers divisor, image side divisor)
CPU_SCALE = (4, 1, 2)
TINY_SCALE = (16, 20, 4)  # --scale tiny: 1-2 heads, 1-2 layers, 96-252 px teachers
#: source image sizes the synthetic crops are taken from (W, H)
IMAGE_SIZES = ((640, 480), (500, 375), (512, 512), (480, 640))


@dataclasses.dataclass(frozen=True)
class Setting:
    """Teachers (preset, input size) and student (config, resolution) of one run."""

    teachers: tuple[tuple[Preset, int], ...]
    student: StudentConfig
    resolution: int


def report_setting() -> Setting:
    teachers = tuple((at_size(PRESETS[name], size), size) for name, size in REPORT_VIEWS)
    return Setting(teachers, StudentConfig(size="base", heads=heads(teachers)), REPORT_RESOLUTION)


def at_size(p: Preset, size: int) -> Preset:
    """``p`` configured for input ``size`` (only DINOv3's changes: RoPE takes any multiple of its patch)."""
    return dataclasses.replace(p, size=size, config=dict(p.config, image_size=size))


def heads(teachers) -> list[TeacherHead]:
    return [TeacherHead(p.family, p.shape.width, 0 if p.family in DENSE_ONLY else p.summary_channels)
            for p, _ in teachers]


def scaled_preset(p: Preset, w: int, d: int, s: int) -> Preset:
    """``p`` with widths and heads / w (head size kept), layers / d, image side / s, window side / s."""
    c = dict(p.config, hidden_size=p.config["hidden_size"] // w, intermediate_size=p.config["intermediate_size"] // w,
             num_attention_heads=p.config["num_attention_heads"] // w,
             num_hidden_layers=p.config["num_hidden_layers"] // d, image_size=p.config["image_size"] // s)
    shape = dataclasses.replace(p.shape, width=p.shape.width // w, mlp=p.shape.mlp // w, layers=p.shape.layers // d)
    if "window_size" in c:  # SAM3: windows of (side / s)^2 tokens, the same share of global blocks
        every = p.config["num_hidden_layers"] // len(p.config["global_attn_indexes"])
        pretrain = c.get("pretrain_image_size", model_classes(p.family)[1]().pretrain_image_size)
        c.update(window_size=c["window_size"] // s, pretrain_image_size=pretrain // s,
                 global_attn_indexes=[i for i in range(c["num_hidden_layers"]) if (i + 1) % every == 0])
        shape = dataclasses.replace(shape, window=c["window_size"] ** 2, global_layers=len(c["global_attn_indexes"]))
    return dataclasses.replace(p, name=f"{p.name}/scaled", size=p.size // s, config=c, shape=shape,
                               summary_channels=p.summary_channels // w)


def cpu_setting() -> Setting:
    w, d, s = CPU_SCALE
    base = report_setting()
    teachers = tuple((scaled_preset(p, w, d, s), size // s) for p, size in base.teachers)
    vit = base.student.vit()
    student = StudentConfig(size="tiny", width=vit.width // w, num_heads=vit.heads // w, depth=vit.depth // d,
                            heads=heads(teachers))
    return Setting(teachers, student, base.resolution // s)


def tiny_setting() -> Setting:
    """A smoke-test setting (seconds on a CPU): every teacher / TINY_SCALE, the "micro" student at 112 px.
    Its figures only show that the script runs; its bound is not the report's."""
    w, d, s = TINY_SCALE
    teachers = tuple((scaled_preset(p, w, d, s), size // s) for p, size in report_setting().teachers)
    return Setting(teachers, StudentConfig(size="micro", heads=heads(teachers)), REPORT_RESOLUTION // s)


SETTINGS = {"full": report_setting, "cpu": cpu_setting, "tiny": tiny_setting}


def flops(setting: Setting) -> dict:
    """Forward FLOPs per image of each teacher at its view size and of the student; the step and R."""
    with torch.device("meta"):
        student = Student(setting.student)
    fwd = student.num_flops(setting.resolution, setting.resolution)
    teachers = {p.family: p.flops(size) for p, size in setting.teachers}
    step = 3 * fwd
    return {"teachers": teachers, "student_forward": fwd, "student_step": step,
            "bound": (sum(teachers.values()) + step) / step}


def counted(setting: Setting) -> dict:
    """The same FLOPs counted by ``FlopCounterMode`` on the meta device (no memory, no weights):
    each teacher's forward and the student's forward + backward (all heads)."""
    from torch.utils.flop_counter import FlopCounterMode

    teachers = {}
    for p, size in setting.teachers:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            p.build_meta()(pixel_values=torch.empty(1, 3, size, size, device="meta"))
        teachers[p.family] = fc.get_total_flops()
    with torch.device("meta"):
        student = Student(setting.student)
    with FlopCounterMode(display=False) as fc:
        out = student(torch.empty(1, 3, setting.resolution, setting.resolution, device="meta"))
        sum(v.float().sum() for v in [*out.dense.values(), *out.summary.values()]).backward()
    step = fc.get_total_flops()
    return {"teachers": teachers, "student_step": step, "bound": (sum(teachers.values()) + step) / step}


# ---- the batch ---------------------------------------------------------------------------------

def crops(rng, batch: int, setting: Setting) -> list:
    """Student crops as ``CacheDataset`` samples them (aligned to the first teacher's view half the time)."""
    first, size = setting.teachers[0]
    grid = (setting.resolution // setting.student.patch,) * 2
    out = []
    for _ in range(batch):
        W, H = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        view_grid = (size // first.shape.patch,) * 2
        out.append(((W, H), sample_crop(rng, (W, H), (0, 0, W, H), view_grid, grid, CROPS)))
    return out


def cache_batch(rng, samples: list, setting: Setting) -> dict:
    """What ``collate`` returns for these crops: per teacher, random windows of the cells the crop
    needs (``window_for``, one cell of margin, zero-padded), maps, extents, Ω, summaries."""
    grid = (setting.resolution // setting.student.patch,) * 2
    out = {}
    for p, size in setting.teachers:
        view_grid = (size // p.shape.patch,) * 2
        parts = []
        for (W, H), crop in samples:
            r0, r1, c0, c1 = window_for(crop.box, (0, 0, W, H), view_grid)
            m = cell_map(crop.box, grid, (0, 0, W, H), view_grid, crop.flip).shifted(r0, c0)
            parts.append((r1 - r0, c1 - c0, m.as_array(), omega(crop.box, grid, (0, 0, W, H), crop.flip)))
        hmax, wmax = max(q[0] for q in parts), max(q[1] for q in parts)
        windows = torch.zeros(len(parts), p.shape.width, hmax, wmax)
        for k, (h, w, _, _) in enumerate(parts):
            windows[k, :, :h, :w] = torch.from_numpy(rng.standard_normal((p.shape.width, h, w), dtype=np.float32))
        out[p.family] = {"window": windows, "map": torch.from_numpy(np.stack([q[2] for q in parts])),
                         "extent": torch.tensor([[q[0], q[1]] for q in parts]),
                         "omega": torch.from_numpy(np.stack([q[3] for q in parts])),
                         "summary": torch.randn(len(parts), max(p.summary_channels, 1))}
    return out


def to(batch, device):
    if isinstance(batch, dict):
        return {k: to(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


# ---- the two steps -----------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Steps:
    """The student, its optimizer and the teachers; ``cache`` and ``online`` each run one step and
    return (seconds for the targets, seconds for the student part)."""

    def __init__(self, setting: Setting, device: torch.device):
        self.setting, self.device = setting, device
        torch.manual_seed(0)
        self.student = Student(setting.student).to(device).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-3, weight_decay=0.05)
        self.teachers = {p.family: (p.random_teacher(str(device)), size) for p, size in setting.teachers}
        if device.type == "cuda":  # featcache loads teachers in bfloat16 on CUDA (forwards under bf16 autocast)
            for teacher, _ in self.teachers.values():
                teacher.model.to(torch.bfloat16)
        self.grid = (setting.resolution // setting.student.patch,) * 2

    def cache(self, image: torch.Tensor, batch: dict) -> tuple[float, float]:
        t0 = time.perf_counter()
        targets = {name: (lookup_targets(b["window"], b["map"], b["extent"], self.grid).permute(0, 2, 3, 1),
                          b["omega"], b["summary"]) for name, b in batch.items()}
        sync(self.device)
        t1 = time.perf_counter()
        self.student_step(image, targets)
        return t1 - t0, time.perf_counter() - t1

    def online(self, image: torch.Tensor, pixels: dict) -> tuple[float, float]:
        t0 = time.perf_counter()
        targets = {}
        b, (hs, ws) = len(image), self.grid
        full = torch.ones(b, hs, ws, dtype=torch.bool, device=self.device)
        for name, (teacher, _) in self.teachers.items():
            with torch.inference_mode():
                out = teacher.extract(pixels[name])
                h, w = out.dense.shape[1:3]
                maps = torch.tensor([[w / ws, 0.0, h / hs, 0.0]], dtype=torch.float64).expand(b, 4)
                extent = torch.tensor([[h, w]]).expand(b, 2)
                dense = lookup_targets(out.dense.permute(0, 3, 1, 2), maps, extent, self.grid).permute(0, 2, 3, 1)
            targets[name] = (dense.clone(), full, out.summary.clone())  # plain tensors, usable under autograd
        sync(self.device)
        t1 = time.perf_counter()
        self.student_step(image, targets)
        return t1 - t0, time.perf_counter() - t1

    def student_step(self, image: torch.Tensor, targets: dict) -> None:
        student_step(self.student, self.optimizer, image, targets)


def student_step(model: torch.nn.Module, optimizer, image: torch.Tensor, targets: dict) -> None:
    """Forward, losses, backward, clip, AdamW: the body of ``Trainer.run`` for one micro-batch. ``model`` is
    the student or its ``DistributedDataParallel`` wrapper (benchmarks/ddp_scaling.py); ``targets`` maps each
    teacher to (dense (B, h, w, C), omega (B, h, w), summary (B, Cs))."""
    if image.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(image)
    else:
        out = model(image)
    total = 0.0
    for name, (target, om, summary) in targets.items():
        total = total + spatial_mse(out.dense[name].float(), target, om)
        if name in out.summary:
            total = total + angle_loss(out.summary[name].float(), summary, DISPERSION)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(image.device)


def measure(steps: Steps, args) -> dict:
    """Warm-up, then ``rounds`` rounds of one cache and one online step, the order alternating."""
    rng = np.random.default_rng(0)
    setting, device = steps.setting, steps.device
    samples = crops(rng, args.batch, setting)
    batch = to(cache_batch(rng, samples, setting), device)
    image = torch.randn(args.batch, 3, setting.resolution, setting.resolution, device=device)
    pixels = {p.family: torch.randn(args.batch, 3, size, size, device=device) for p, size in setting.teachers}
    runs = {"cache": lambda: steps.cache(image, batch), "online": lambda: steps.online(image, pixels)}
    for fn in runs.values():
        fn()  # warm-up
    times = {(k, part): [] for k in runs for part in ("targets", "student", "step")}
    for r in range(args.rounds):
        for k in (("cache", "online") if r % 2 == 0 else ("online", "cache")):
            a, b = runs[k]()
            times[k, "targets"].append(a)
            times[k, "student"].append(b)
            times[k, "step"].append(a + b)
    return {f"{k}_{part}_s": v for (k, part), v in times.items()}


# ---- report ------------------------------------------------------------------------------------

def summarize(setting: Setting, args, times: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    run, report = flops(setting), flops(report_setting())
    sig = PRESETS["siglip2-g-384"].flops(384)
    featsharp = report["bound"] + 9 * sig / report["student_step"]
    ratio = med["online_step_s"] / med["cache_step_s"]
    per_round = [o / c for o, c in zip(times["online_step_s"], times["cache_step_s"])]
    b = args.batch
    return {
        "device": args.device, "scale": args.scale, "batch": b, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "student": {"width": setting.student.vit().width, "depth": setting.student.vit().depth,
                    "resolution": setting.resolution},
        "teachers": {p.family: {"width": p.shape.width, "layers": p.shape.layers, "input": size}
                     for p, size in setting.teachers},
        "flops_per_image": {"teachers": run["teachers"], "student_forward": run["student_forward"],
                            "student_step": run["student_step"]},
        "bound_report": report["bound"], "bound_report_with_featsharp_tiles": featsharp,
        "bound_run": run["bound"], "bound_run_vs_report": run["bound"] / report["bound"],
        "seconds": med, "per_round_ratio": per_round,
        "ratio": ratio, "fraction": ratio / run["bound"], "target_fraction": 0.8,
        "teacher_flops_per_s": b * sum(run["teachers"].values()) / med["online_targets_s"],
        "student_step_flops_per_s": b * run["student_step"] / med["cache_student_s"],
    }


def show(s: dict) -> None:
    t = s["seconds"]
    print(f"device {s['device']} ({s['scale']} configs), batch {s['batch']}, student width {s['student']['width']} "
          f"depth {s['student']['depth']} at {s['student']['resolution']} px, median of {s['rounds']} interleaved "
          f"rounds, {s['torch_threads']} torch threads, load average "
          + ", ".join(f"{x:.2f}" for x in s["load_average"]))
    fl = s["flops_per_image"]
    teach = ", ".join(f"{k} {v['width']}w x {v['layers']}L @{v['input']} {fl['teachers'][k] / 1e9:.1f}"
                      for k, v in s["teachers"].items())
    print(f"  forward GFLOP per image: {teach}; student forward {fl['student_forward'] / 1e9:.2f}, "
          f"step (3x) {fl['student_step'] / 1e9:.2f}")
    print(f"  bound R = (teachers + step) / step: report (ViT-B@448; SigLIP2-g@384, DINOv3-7B@448, SAM3@1008) "
          f"{s['bound_report']:.2f} ({s['bound_report_with_featsharp_tiles']:.2f} with FeatSharp's 9 tiles); "
          f"this run {s['bound_run']:.2f} ({s['bound_run_vs_report']:.3f}x the report's)")
    print(f"  cache step  {t['cache_step_s'] * 1e3:9.1f} ms  (lookup_targets {t['cache_targets_s'] * 1e3:.1f} ms, "
          f"student {t['cache_student_s'] * 1e3:.1f} ms)")
    print(f"  online step {t['online_step_s'] * 1e3:9.1f} ms  (teachers + resample "
          f"{t['online_targets_s'] * 1e3:.1f} ms, student {t['online_student_s'] * 1e3:.1f} ms)")
    print(f"  achieved: teachers {s['teacher_flops_per_s'] / 1e9:.1f} GFLOP/s, student step "
          f"{s['student_step_flops_per_s'] / 1e9:.1f} GFLOP/s")
    rr = s["per_round_ratio"]
    print(f"  t_online / t_cache = {s['ratio']:.2f} (rounds {min(rr):.2f}-{max(rr):.2f});  bound "
          f"{s['bound_run']:.2f};  fraction of the bound = {s['fraction']:.3f}  (target >= {s['target_fraction']})")
    for name, c in s.get("counted", {}).items():
        print(f"  FlopCounterMode on meta, {name}: teachers {sum(c['teachers'].values()) / 1e9:.1f} GFLOP, student "
              f"forward + backward {c['student_step'] / 1e9:.2f} GFLOP, R = {c['bound']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", choices=tuple(SETTINGS), default=None,
                    help="model sizes: full-size report configs (default on CUDA), scaled (default on CPU) or tiny "
                         "(a smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="default 2 on CPU, 32 on CUDA")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on CPU (1: on a shared 2-core machine two threads stall each other "
                         "whenever another process runs; a student step then varied 1-10 s against 0.5 s)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count-flops", action="store_true",
                    help="also count the FLOPs with FlopCounterMode on the meta device (cross-check of the bound)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.scale = args.scale or ("full" if device.type == "cuda" else "cpu")
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.scale]()
    steps = Steps(setting, device)
    result = summarize(setting, args, measure(steps, args))
    if args.count_flops:
        result["counted"] = {"report": counted(report_setting()), "run": counted(setting)}
    if args.json:
        print(json.dumps(result))
    else:
        show(result)


if __name__ == "__main__":
    main()
