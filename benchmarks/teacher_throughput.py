"""Wrapper overhead: images/s of ``teacher.extract`` vs a bare transformers forward, same batch.

    python benchmarks/teacher_throughput.py [--batch 8] [--rounds 5]

Mid-size random-weight configs of each family (width 384, 6 blocks) are saved and loaded through
featcache's real loading path; the bare forward calls the very model object the teacher holds,
under the same ``torch.inference_mode``. Rounds interleave the two; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featcache.teachers import create_teacher

MID = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)
CONFIGS = {
    "siglip2": ("SiglipVisionModel", "SiglipVisionConfig", dict(MID, image_size=224, patch_size=16)),
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(MID, image_size=224, patch_size=16, use_gated_mlp=True,
                                                         hidden_act="silu", num_register_tokens=4)),
    "sam3": ("Sam3ViTModel", "Sam3ViTConfig", dict(MID, image_size=336, patch_size=14, window_size=12,
                                                   global_attn_indexes=[2, 5], pretrain_image_size=336)),
}


def save(family: str, folder: Path) -> None:
    import transformers

    model_name, config_name, cfg = CONFIGS[family]
    getattr(transformers, model_name)(getattr(transformers, config_name)(**cfg)).save_pretrained(folder)


def rate(fn, batch: int, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return batch * reps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
