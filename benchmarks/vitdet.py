"""Student forward time with ViTDet windows against global attention (DESIGN.md §5, ALGORITHMS.md §8).

    python benchmarks/vitdet.py                                   # CPU: "tiny" (192 wide, 12 blocks), 512 and 1024 px
    python benchmarks/vitdet.py --sizes 512 1024 2048 --device cuda --size-name base   # GPU, bf16 autocast
    python benchmarks/vitdet.py --depth 4 --global-blocks 3 --sizes 256 512 --repeat 1   # run locally, seconds

For each input side the same backbone (no teacher adaptors: their cost does not depend on attention) is timed
with global attention everywhere and with windows of 8 and 16 tokens. The windowed models keep the default global
blocks (the last of each quarter of the depth, so every block is global below depth 5: pass ``--global-blocks``
with a small ``--depth``). Rounds interleave the three models after one warm-up each and medians are reported;
``ratio`` is windowed time / global time measured in this run, ``flop ratio`` the same from
``Student.num_flops``. 2048 px is left out of the CPU default: global attention over 16384 tokens takes about
a minute per forward there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import use_checkout  # noqa: E402

use_checkout()  # an uninstalled checkout (a lent GPU machine) maps featcache.train like an install

from featcache.train.student import SIZES, StudentConfig, build_student  # noqa: E402

WINDOWS = (None, 8, 16)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(model, pixels: torch.Tensor, device: str) -> float:
    """Seconds for one forward."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        model(pixels)
    sync(device)
    return time.perf_counter() - t0


def config(args, window: int | None) -> StudentConfig:
    """The benchmarked student: global attention when ``window`` is None."""
    blocks = tuple(args.global_blocks) if window and args.global_blocks is not None else None
    return StudentConfig(args.size_name, depth=args.depth, vitdet_window_size=window, global_blocks=blocks)


def measure(args, side: int) -> dict:
    """Median forward times and FLOPs of the three attention settings at one input side."""
    models = {ws: build_student(config(args, ws)).to(args.device).eval() for ws in WINDOWS}
    pixels = torch.randn(args.batch, 3, side, side, device=args.device)
    times = {ws: [] for ws in WINDOWS}
    for ws in WINDOWS:  # warm-up
        timed(models[ws], pixels, args.device)
    for _ in range(args.repeat):
        for ws in WINDOWS:
            times[ws].append(timed(models[ws], pixels, args.device))
    ms = {ws: 1e3 * statistics.median(t) for ws, t in times.items()}
    flops = {ws: models[ws].num_flops(side, side) for ws in WINDOWS}
    h, w = models[None].token_grid(side, side)
    row = {"px": side, "tokens": h * w, "global_ms": ms[None], "global_gflop": flops[None] / 1e9}
    for ws in WINDOWS[1:]:
        row[f"w{ws}_ms"] = ms[ws]
        row[f"w{ws}_ratio"] = ms[ws] / ms[None]
        row[f"w{ws}_flop_ratio"] = flops[ws] / flops[None]
    return row


def table(rows: list[dict]) -> str:
    head = f"{'px':>5} {'tokens':>6} {'global ms':>10} {'GFLOP':>8}"
    for ws in WINDOWS[1:]:
        head += f" | {f'w{ws} ms':>9} {'ratio':>6} {'flop ratio':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['px']:>5} {r['tokens']:>6} {r['global_ms']:>10.1f} {r['global_gflop']:>8.1f}"
        for ws in WINDOWS[1:]:
            line += f" | {r[f'w{ws}_ms']:>9.1f} {r[f'w{ws}_ratio']:>6.2f} {r[f'w{ws}_flop_ratio']:>10.2f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size-name", default="tiny", choices=list(SIZES))
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--global-blocks", type=int, nargs="*", default=None,
                        help="global blocks of the windowed models (default: the last of each quarter)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sides in px (multiples of 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = args.sizes or ([512, 1024, 2048] if args.device.startswith("cuda") else [512, 1024])
    rows = [measure(args, side) for side in args.sizes]
    if args.json:
        print(json.dumps({"device": args.device, "size_name": args.size_name, "depth": args.depth,
                          "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
        return
    depth = args.depth or SIZES[args.size_name].depth
    print(f"student {args.size_name!r}, depth {depth}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeat}")
    print(table(rows))


if __name__ == "__main__":
    main()
