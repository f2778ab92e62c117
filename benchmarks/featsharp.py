"""FeatSharp inference against its floor, ten bare teacher forwards per image (issue 14); with
``--learning``, what training buys on held-out images (issue 23).

    PYTHONPATH=. python benchmarks/featsharp.py                    # CPU: a mid-size SigLIP2 at 384, ~2 min
    PYTHONPATH=. python benchmarks/featsharp.py --device cuda --full --batch 8   # a lent GPU: SigLIP2-g
    PYTHONPATH=. python benchmarks/featsharp.py --learning         # CPU: 300 steps at 128 px, ~2 min idle

One image through FeatSharp 3x = the teacher on its global view and its 9 tiles (one batch of 10
inputs at the native 384 px), then the upsampler (PHI-S, JBU at 72x72, the fuser's local-attention
block over 2C channels). Its floor is the 10 forwards alone. Both are timed on the same random-weight
teacher (``--full``: SigLIP2-g's published config, TEACHERS.md; else a mid-size SigLIP2 of width 384,
6 blocks, 6 heads at 384 px) and a random-weight upsampler of the teacher's width, in interleaved
rounds (medians), float32 on CPU, bf16 autocast on CUDA. Printed: ms per image for each, their ratio
(FeatSharp / floor, >= 1), the upsampler's own share, and on CUDA the peak GPU memory of a FeatSharp
batch. The machine may be shared: the load average is printed.

``--learning``: the scale the test suite cannot afford (it runs 60 steps at 64 px). A patch-local
teacher (DINOv3 with no blocks at ``--size`` px, random weights: each patch's features depend on its
pixels only, so the exact map of a 3x canvas is known) and the 26 scikit-image photos; ``--steps``
of training and, as the baseline, one step; both evaluated on the held-out photos (a tenth, by the id
rule) against the teacher's jittered views and against the exact map. Printed: the held-out errors
and the ratios FeatSharp / bilinear and trained / untrained (< 1: better).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from featcache.roofline import VitShape
from featcache.teachers.presets import preset
from featcache.upsample import run
from featcache.upsample.featsharp import FeatSharp, FeatSharpConfig

MID = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)


def teacher(full: bool, device: str):
    p = preset("siglip2-g-384")
    if not full:
        p = dataclasses.replace(p, name="siglip2-mid-384", config={**p.config, **MID},
                                shape=VitShape(width=384, mlp=1536, layers=6, patch=16, pool_head=True))
    t = p.random_teacher(device)
    if device == "cuda":
        t.model.to(torch.bfloat16)
    return t


def upsampler(spec, device: str, heads: int) -> FeatSharp:
    """A random-weight FeatSharp 3x of the teacher ``spec``'s width and native grid."""
    torch.manual_seed(0)
    channels = spec.channels
    config = FeatSharpConfig(channels=channels, grid=spec.grid(), patch=spec.patch_size, factor=3, heads=heads)
    eye = torch.eye(channels)
    return FeatSharp(config, (torch.zeros(channels), eye, eye)).to(device).eval()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def inference(t, model: FeatSharp, batch: int, rounds: int, device: str) -> dict:
    """ms per image of the floor (the teacher on a 3x canvas's global view and 9 tiles) and of FeatSharp 3x
    (the same forwards + the upsampler), medians of interleaved rounds; on CUDA the peak GPU memory."""
    load = [round(x, 2) for x in os.getloadavg()]
    side = 3 * t.spec.input_size[0]
    canvas = torch.randn(batch, 3, side, side, device=device)
    inputs = run.teacher_batch(canvas, t.spec, 3)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")

    def floor():
        with torch.inference_mode(), autocast:
            t.extract(inputs, dtype=None)

    def featsharp():
        with torch.inference_mode(), autocast:
            run.upsample(model, t, canvas)

    floor(), featsharp()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {"floor": [], "featsharp": []}
    for r in range(rounds):
        for name, fn in (("floor", floor), ("featsharp", featsharp))[::1 if r % 2 == 0 else -1]:
            times[name].append(timed(fn, device) / batch)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out = {"device": device, "canvas": side, "channels": t.spec.channels, "batch": batch, "rounds": rounds,
           "load_average": load, "ms_per_image": ms, "ratio_featsharp_to_floor": ms["featsharp"] / ms["floor"],
           "upsampler_share": 1 - ms["floor"] / ms["featsharp"],
           "upsampler_parameters": sum(p.numel() for p in model.parameters())}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full", action="store_true", help="SigLIP2-g's full config (a GPU job)")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--learning", action="store_true", help="train and evaluate instead (see the docstring)")
    ap.add_argument("--steps", type=int, default=300, help="--learning: training steps")
    ap.add_argument("--size", type=int, default=128, help="--learning: the patch-local teacher's input size (px)")
    args = ap.parse_args()
    if args.learning:
        return learning(args)
    t = teacher(args.full, args.device)
    model = upsampler(t.spec, args.device, heads=16 if args.full else 6)
    out = inference(t, model, args.batch, args.rounds, args.device)
    out["teacher"] = "siglip2-g-384" if args.full else "siglip2-mid-384 (width 384, 6 blocks)"
    load = out["load_average"]
    ms = out["ms_per_image"]
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['teacher']} on {args.device}, batch {args.batch}, median of {args.rounds} rounds, load {load}")
    print(f"  ten bare teacher forwards (the floor): {ms['floor']:.1f} ms/image")
    print(f"  FeatSharp 3x (forwards + upsampler):   {ms['featsharp']:.1f} ms/image")
    print(f"  ratio {out['ratio_featsharp_to_floor']:.3f}; the upsampler's own share {out['upsampler_share']:.1%}; "
          f"{out['upsampler_parameters'] / 1e6:.1f} M upsampler parameters"
          + (f"; peak GPU memory {out['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in out else ""))


LEARN = dict(batch_size=2, views=2, heads=4, stats_images=8, warmup=20, log_every=50, lr=1e-3)


def learning(args) -> None:
    """Train ``--steps`` and one step on the photos; print held-out errors and their ratios."""
    import tempfile
    from pathlib import Path

    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from featcache.upsample import training
    from featcache.upsample.evaluate import evaluate
    from tests.support.teachers import DINOV3
    from tests.support.training import photos

    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        config = DINOv3ViTConfig(**{**DINOV3, "num_hidden_layers": 0, "image_size": args.size})
        DINOv3ViTModel(config).eval().save_pretrained(tmp / "teacher")
        images = photos(tmp / "photos")
        results, seconds = {}, {}
        for name, steps in (("trained", args.steps), ("untrained", 1)):
            s = training.Settings(family="dinov3", source=str(tmp / "teacher"), images=str(images), steps=steps,
                                  save_every=steps, device=args.device, **LEARN)
            t0 = time.perf_counter()
            training.train(s, tmp / name)
            seconds[name] = time.perf_counter() - t0
            results[name] = evaluate(str(tmp / name), str(images), device=args.device)
    _report_learning(args, results, seconds["trained"], load)


def _report_learning(args, results: dict, seconds: float, load: list) -> None:
    t, u = results["trained"], results["untrained"]
    out = {"device": args.device, "size": args.size, "steps": args.steps, "train_seconds": seconds,
           "load_average": load, "images": t.images, "trained": t.to_dict(), "untrained": u.to_dict(),
           "views_featsharp_to_bilinear": t.featsharp_error / t.bilinear_error,
           "views_trained_to_untrained": t.featsharp_error / u.featsharp_error,
           "exact_featsharp_to_bilinear": t.exact_error["featsharp"] / t.exact_error["bilinear"],
           "exact_trained_to_untrained": t.exact_error["featsharp"] / u.exact_error["featsharp"]}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"FeatSharp 3x of a patch-local {args.size}-px teacher, {args.steps} steps in {seconds:.0f} s on "
          f"{args.device}, {t.images} held-out photos, load {load}")
    print(f"  against the teacher's views: FeatSharp {t.featsharp_error:.4f}, bilinear {t.bilinear_error:.4f}, "
          f"untrained {u.featsharp_error:.4f}")
    print(f"  against the exact map:       FeatSharp {t.exact_error['featsharp']:.4f}, bilinear "
          f"{t.exact_error['bilinear']:.4f}, untrained {u.exact_error['featsharp']:.4f}")
    print(f"  ratios FeatSharp / bilinear: views {out['views_featsharp_to_bilinear']:.3f}, exact "
          f"{out['exact_featsharp_to_bilinear']:.3f}; trained / untrained: views "
          f"{out['views_trained_to_untrained']:.3f}, exact {out['exact_trained_to_untrained']:.3f}")


if __name__ == "__main__":
    main()
