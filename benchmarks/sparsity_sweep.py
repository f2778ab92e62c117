"""A small pruning sweep of a student on a cache of real photos, drawn as the Sparsity Roofline (issue 15).

    PYTHONPATH=. python benchmarks/sparsity_sweep.py [--out sweep] [--base-steps 150] [--steps 60]

The cache: the 26 scikit-image photos through the three tiny teachers the tests use (real transformers
classes, random weights; views siglip2@64, dinov3@64/128, sam3-mosaic2@56). A ``tiny`` student (192 wide,
12 blocks) is distilled for ``--base-steps``; then, from its weights (``--init``), each of dense (no
pruning), unstructured and block 4x4 at degrees 0.5, 0.75, 0.9, and 2:4 is distilled ``--steps`` more
with ``--prune``. Quality: the held-out distillation loss (sum of the spatial and summary terms of the
three teachers; lower is better). Speedup: the roofline's predicted dense / sparse forward time of the
same student at 224 px, batch 32, on this machine's CPU (the ``measured`` preset, float32), where its
linear layers are compute-bound — predicted, no sparse kernel runs. (On an H100 in bf16 a 192-wide
student's linears are bound by their activations' bytes at any batch, and weight sparsity predicts no
speedup: ``--device h100`` shows it.) Writes
``OUT/results.csv`` and ``OUT/sparsity_roofline.png`` (``featcache roofline plot``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

from featcache import roofline
from featcache.sparsity_plot import draw
from featcache.train import config
from featcache.train.loop import train
from featcache.train.student import StudentConfig
from tests.support import training
from tests.test_train.test_loop import CONFIG

SWEEP = [("dense", 0.0)] + [(p, d) for p in ("unstructured", "block") for d in (0.5, 0.75, 0.9)] + [("2:4", 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweep")
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="measured", help="the roofline's device: measured (this CPU), a100, h100, h200")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp())
    cache = tmp / "cache"
    training.build(cache, training.photos(tmp / "photos"), training.teachers(tmp / "models"))
    cfg_file = tmp / "train.toml"
    cfg_file.write_text(CONFIG.replace('size = "micro"', 'size = "tiny"'))
    common = ["eval.every=100000", "log_every=1000", "checkpoint_every=100000", "eval.pictures=false"]
    base = tmp / "base"
    train(config.load(cfg_file, cache=str(cache), overrides=common + [f"optim.steps={args.base_steps}"]), base)
    shape = StudentConfig(size="tiny").roofline_shape()
    hw = roofline.measure("cpu") if args.device == "measured" else roofline.HARDWARE[args.device]
    model = roofline.ops(shape, 224, 224, 32, hw.itemsize)
    rows = []
    for pattern, degree in SWEEP:
        prune = [] if pattern == "dense" else [f'prune="{pattern}:{degree}"' if pattern != "2:4" else 'prune="2:4"']
        cfg = config.load(cfg_file, cache=str(cache), overrides=common + [f"optim.steps={args.steps}"] + prune)
        result = train(cfg, tmp / f"{pattern.replace(':', '-')}-{degree}", init=str(base))
        speedup = 1.0 if pattern == "dense" else roofline.speedup(model, hw, pattern, degree)
        rows.append({"pattern": pattern, "degree": degree, "speedup": round(speedup, 4),
                     "heldout_loss": round(sum(result.heldout.values()), 5)})
        print(f"{pattern:13s} {degree:5.2f}  predicted speedup {speedup:6.3f}  held-out loss {rows[-1]['heldout_loss']:.4f}",
              flush=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    draw(str(out / "results.csv"), str(out / "sparsity_roofline.png"))
    print(f"speedups predicted on {hw.name}; load average at the start {load}; wrote {out / 'results.csv'} and {out / 'sparsity_roofline.png'}")


if __name__ == "__main__":
    main()
