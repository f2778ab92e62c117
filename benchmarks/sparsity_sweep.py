"""A small pruning sweep of a student on a cache of real photos, drawn as the Sparsity Roofline (issue 15).

    PYTHONPATH=. python benchmarks/sparsity_sweep.py [--out sweep] [--base-steps 150] [--steps 60]
        [--device measured|a100|h100|h200] [--student auto|tiny|small|...] [--batch 32]
        [--sparsity unstructured:0.5 ... block8x8:0.75 ... 2:4]

The cache: the 26 scikit-image photos through the three tiny teachers the tests use (real transformers
classes, random weights; views siglip2@64, dinov3@64/128, sam3-mosaic2@56). A student is distilled for
``--base-steps``; then, from its weights (``--init``), every point of the sweep -- dense (no pruning) and
each ``--sparsity`` spec (default: unstructured and block 4x4 at degrees 0.5, 0.75, 0.9, and 2:4; a block
size is named as ``block8x8:0.75``) -- is distilled the same ``--steps`` more, with the same seed, so
every point has had exactly the same training (the ``steps`` column says so). Quality: the held-out
distillation loss (sum of the spatial and summary terms of the three teachers; lower is better).
Speedup: the roofline's predicted dense / sparse forward time of the same student at 224 px, batch
``--batch``, on ``--device`` (``measured``: this machine's CPU in float32; 2:4 at the device's
``sparse_peak``) -- predicted, no sparse kernel runs. ``--student auto`` takes the narrowest student whose
block linear layers are all compute-bound there (a memory-bound layer gains from fewer bytes only, and
weight sparsity would predict little), and says which. Writes ``OUT/results.csv`` and
``OUT/sparsity_roofline.png`` (``featcache roofline plot``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

from featcache import roofline
from featcache.sparsity_plot import draw
from featcache.train import config
from featcache.train.loop import train
from featcache.train.student import SIZES, StudentConfig
from tests.support import training
from tests.test_train.test_loop import CONFIG

SWEEP = [f"{p}:{d}" for p in ("unstructured", "block4x4") for d in (0.5, 0.75, 0.9)] + ["2:4"]
RESOLUTION = 224


def compute_bound(size: str, hw: roofline.Hardware, batch: int) -> bool:
    """True when every block linear layer of the ``size`` student is compute-bound, dense, on ``hw``."""
    model = roofline.ops(StudentConfig(size=size).roofline_shape(), RESOLUTION, RESOLUTION, batch, hw.itemsize)
    return all(t.bound == "compute" for t in roofline.predict(model, hw) if t.op.sparsifiable)


def pick_student(name: str, hw: roofline.Hardware, batch: int) -> str:
    """``name``, or for ``auto`` the narrowest student (micro aside) compute-bound on ``hw``."""
    if name != "auto":
        return name
    sizes = [s for s in SIZES if s != "micro"]
    found = next((s for s in sizes if compute_bound(s, hw, batch)), None)
    if found is None:
        raise SystemExit(f"no student is compute-bound on {hw.name} at batch {batch}: raise --batch")
    return found


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60, help="steps of every point, dense included, from the base")
    ap.add_argument("--device", default="measured", help="the roofline's device: measured (this CPU), a100, h100, h200")
    ap.add_argument("--student", default="auto", choices=["auto", *SIZES])
    ap.add_argument("--batch", type=int, default=32, help="images per forward of the predicted speedup")
    ap.add_argument("--sparsity", nargs="+", default=SWEEP, help="specs: unstructured:D, block:D, blockRxC:D, 2:4")
    args = ap.parse_args()
    try:
        args.sparsity = [roofline.parse_sparsity(s) for s in args.sparsity]
    except ValueError as e:
        ap.error(f"--sparsity: {e}")
    return args


def label(spec) -> str:
    """The plot's pattern of a point: dense, unstructured, blockRxC (its block size named) or 2:4."""
    if spec is None:
        return "dense"
    return "2:4" if spec.pattern == "2:4" else str(spec).rpartition(":")[0]


def point(cfg_file: Path, cache: Path, common: list[str], base: Path, out: Path, spec) -> tuple[int, float]:
    """(steps trained, held-out loss) of one point: ``spec`` (None: dense) from the base weights."""
    prune = [] if spec is None else [f'prune="{spec}"']
    cfg = config.load(cfg_file, cache=str(cache), overrides=common + prune)
    result = train(cfg, out, init=str(base))
    return result.steps, round(sum(result.heldout.values()), 5)


def main() -> None:
    args = parse_args()
    hw = roofline.measure("cpu") if args.device == "measured" else roofline.HARDWARE[args.device]
    student = pick_student(args.student, hw, args.batch)
    bound = "compute" if compute_bound(student, hw, args.batch) else "memory"
    print(f"student {student}: its block linears are {bound}-bound on {hw.name} at {RESOLUTION} px, "
          f"batch {args.batch}", flush=True)
    out, load, t0 = Path(args.out), [round(x, 2) for x in os.getloadavg()], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    cache = tmp / "cache"
    training.build(cache, training.photos(tmp / "photos"), training.teachers(tmp / "models"))
    cfg_file = tmp / "train.toml"
    # summary weights 1.0 and half free, half mirrored crops: the settings BENCHMARKS.md's figures were
    # measured with (the defaults before issue 25)
    cfg_file.write_text(CONFIG.replace('size = "micro"', f'size = "{student}"')
                        .replace("[[teachers]]\n", "[[teachers]]\nsummary = 1.0\n")
                        + "\n[crop]\naligned_prob = 0.5\nflip_prob = 0.5\n")
    common = ["eval.every=100000", "log_every=1000", "checkpoint_every=100000", "eval.pictures=false"]
    base = tmp / "base"
    train(config.load(cfg_file, cache=str(cache), overrides=common + [f"optim.steps={args.base_steps}"]), base)
    model = roofline.ops(StudentConfig(size=student).roofline_shape(), RESOLUTION, RESOLUTION, args.batch, hw.itemsize)
    rows = []
    for spec in [None, *args.sparsity]:
        name = "dense" if spec is None else str(spec)
        steps, loss = point(cfg_file, cache, common + [f"optim.steps={args.steps}"], base, tmp / name.replace(":", "-"),
                            spec)
        speedup = 1.0 if spec is None else roofline.speedup(model, hw, spec.pattern, spec.degree, spec.block)
        rows.append({"pattern": label(spec),
                     "degree": 0.0 if spec is None else spec.degree, "steps": args.base_steps + steps,
                     "speedup": round(speedup, 4), "heldout_loss": loss})
        print(f"{name:18s} steps {rows[-1]['steps']:4d}  predicted speedup {speedup:6.3f}  held-out loss {loss:.4f}",
              flush=True)
    assert len({r["steps"] for r in rows}) == 1, rows  # every point trained alike
    write(rows, out)
    print(f"student {student}; speedups predicted on {hw.name}; {time.perf_counter() - t0:.0f} s; load average at "
          f"the start {load}; wrote {out / 'results.csv'} and {out / 'sparsity_roofline.png'}")


def write(rows: list[dict], out: Path) -> None:
    """``results.csv`` (pattern, degree, steps, speedup, quality) and its picture."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    draw(str(out / "results.csv"), str(out / "sparsity_roofline.png"))


if __name__ == "__main__":
    main()
