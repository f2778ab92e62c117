"""Wrapper overhead and MFU of the teachers.

    python benchmarks/teacher_throughput.py [--batch 8] [--rounds 5]          # overhead, CPU, mid-size
    python benchmarks/teacher_throughput.py --mfu [--device cuda] [--batch 32] # MFU

Overhead: mid-size random-weight configs of each family (width 384, 6 blocks) are saved and loaded
through featcache's real loading path; the bare forward calls the very model object the teacher
holds, under the same ``torch.inference_mode``. Rounds interleave the two; medians are reported.

MFU: images/s of ``extract`` x analytic FLOPs per image (ALGORITHMS.md §8) / a matmul ceiling
measured in the same run (bf16 8192^3 on CUDA, float32 2048^3 on CPU). On CUDA the full-size
presets (random weights, bf16 autocast) at native size; on CPU the mid-size configs, which only
checks the arithmetic of this script.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featcache.roofline import VitShape, vit_flops
from featcache.teachers import create_teacher
from featcache.teachers.presets import PRESETS

MID = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)
CONFIGS = {
    "siglip2": ("SiglipVisionModel", "SiglipVisionConfig", dict(MID, image_size=224, patch_size=16)),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(MID, image_size=224, patch_size=16, use_gated_mlp=True,
                                                         hidden_act="silu", num_register_tokens=4)),
    "sam3": ("Sam3ViTModel", "Sam3ViTConfig", dict(MID, image_size=336, patch_size=14, window_size=12,
                                                   global_attn_indexes=[2, 5], pretrain_image_size=336)),
}
MID_SHAPES = {
    "siglip2": VitShape(384, 1536, 6, 16, pool_head=True),
    "dinov3": VitShape(384, 1536, 6, 16, gated=True, prefix_tokens=5),
    "sam3": VitShape(384, 1536, 6, 14, window=144, global_layers=2),
}
MFU_TARGETS = {"dinov3": 0.60, "siglip2": 0.55, "sam3": 0.35}


def save(family: str, folder: Path) -> None:
    import transformers

    model_name, config_name, cfg = CONFIGS[family]
    getattr(transformers, model_name)(getattr(transformers, config_name)(**cfg)).save_pretrained(folder)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, batch: int, reps: int, device: str = "cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return batch * reps / (time.perf_counter() - t0)


def matmul_ceiling(device: str, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s: the roof MFU is taken against."""
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def overhead(args) -> None:
    print(f"CPU, float32, batch {args.batch}, torch threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for family in CONFIGS:
            save(family, Path(tmp) / family)
            teacher = create_teacher(family, str(Path(tmp) / family))
            size = teacher.spec.input_size
            pixels = torch.randn(args.batch, 3, *size)
            bare, wrapped = [], []
            with torch.inference_mode():
                teacher.extract(pixels)  # warm-up
                for _ in range(args.rounds):
                    bare.append(rate(lambda: teacher.model(pixel_values=pixels), args.batch, args.reps))
                    wrapped.append(rate(lambda: teacher.extract(pixels), args.batch, args.reps))
            b, w = statistics.median(bare), statistics.median(wrapped)
            print(f"  {family:8s} @{size[0]}: bare {b:7.1f} img/s  extract {w:7.1f} img/s  "
                  f"overhead {100 * (1 - w / b):+5.1f}%  (target <= 5%)")


def mfu_row(teacher, flops: int, batch: int, reps: int, rounds: int, device: str, roof: float) -> dict:
    """Median images/s of ``teacher.extract`` and its MFU against ``roof`` FLOP/s (:func:`matmul_ceiling`)."""
    pixels = torch.randn(batch, 3, *teacher.spec.input_size, device=device)
    teacher.extract(pixels)  # warm-up
    speed = statistics.median(rate(lambda: teacher.extract(pixels), batch, reps, device) for _ in range(rounds))
    return {"size": teacher.spec.input_size[0], "images_per_second": speed, "gflop_per_image": flops / 1e9,
            "matmul_tflops": roof / 1e12, "mfu": speed * flops / roof}


def mfu(args) -> None:
    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        if device.startswith("cuda"):
            runs = [(p.family, p.random_teacher(device), p.flops()) for p in PRESETS.values()]
        else:
            runs = []
            for family in CONFIGS:
                save(family, Path(tmp) / family)
                teacher = create_teacher(family, str(Path(tmp) / family))
                runs.append((family, teacher, vit_flops(MID_SHAPES[family], *teacher.spec.input_size)))
        for family, teacher, flops in runs:
            r = mfu_row(teacher, flops, args.batch, args.reps, args.rounds, device, matmul_ceiling(device))
            print(f"  {family:8s} @{r['size']}: {r['images_per_second']:8.1f} img/s  {r['gflop_per_image']:8.1f} "
                  f"GFLOP/img  matmul roof {r['matmul_tflops']:6.2f} TFLOP/s  MFU {r['mfu']:5.1%}"
                  + (f"  (target >= {MFU_TARGETS[family]:.0%})" if device.startswith("cuda") else ""))
            del teacher
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mfu", action="store_true", help="MFU against a measured matmul ceiling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.mfu:
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        print(f"MFU on {name}, batch {args.batch}, median of {args.rounds} rounds")
        mfu(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
