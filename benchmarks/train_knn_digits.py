"""kNN top-1 of a distilled student's summaries vs the cached teacher summaries' own, on digits.

scikit-learn's bundled digits are rendered as 64-px images (``featcache.train.digits``, with a
stratified train/test split column), indexed, and extracted with the three tiny random-weight
teachers the tests use (the real transformers classes; no Ray: the per-shard library functions).
A micro student is then distilled from the cache, and each summary head's kNN top-1 (cosine,
k = 20, train split vs test split) is reported before training, after it, and for the teacher's
cached summaries, with the ratio student / teacher.

    PYTHONPATH=. python benchmarks/train_knn_digits.py [--per-class 40] [--steps 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=40, help="digits per class (test: every 4th)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from featcache.train import config, train
    from featcache.train.digits import write_digits
    from tests.support import training

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = tmp / "cache"
        training.build(root, write_digits(tmp / "digits", n_per_class=args.per_class, size=64),
                       training.teachers(tmp / "models"), shard_size=32)
        built = time.perf_counter() - t0
        cfg = config.load(None, cache=str(root), overrides=[
            # the settings BENCHMARKS.md's figure was measured with (the defaults before issue 25)
            'teachers=[{name="siglip2", low="siglip2@64", summary=1.0}, {name="dinov3", low="dinov3@64", '
            'summary=1.0}, {name="sam3", low="sam3-mosaic2@56", summary=1.0}]', "crop.aligned_prob=0.5",
            "crop.flip_prob=0.5",
            'student.size="micro"', "resolution.low=[64]", f"optim.steps={args.steps}",
            f"optim.batch_size={args.batch}", f"optim.lr={args.lr}", "optim.warmup=10", f"seed={args.seed}",
            f"eval.every={args.steps}", "eval.resolution=64", "eval.knn=true", "eval.pictures=false",
            f"log_every={max(1, args.steps // 10)}", "crop.scale=[0.5, 1.0]"])
        t1 = time.perf_counter()
        train(cfg, tmp / "run")
        seconds = time.perf_counter() - t1
        evals = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if "lr" not in r]
    first, last = evals[0], evals[-1]
    heads = sorted({k.split("/")[1] for k in last if k.startswith("knn/")})
    rows = [{"head": h, "before": first[f"knn/{h}/student"], "student": last[f"knn/{h}/student"],
             "teacher": last[f"knn/{h}/teacher"]} for h in heads]
    for r in rows:
        r["ratio"] = r["student"] / r["teacher"] if r["teacher"] else float("nan")
    if args.json:
        print(json.dumps({"args": vars(args), "build_seconds": round(built, 1), "train_seconds": round(seconds, 1),
                          "heads": rows}, indent=1))
        return
    print(f"digits: {args.per_class} per class (1 in 4 held out), {args.steps} steps of {args.batch}, "
          f"micro student at 64 px; cache built in {built:.1f} s, trained in {seconds:.1f} s")
    print(f"{'head':10s} {'student@0':>10s} {'student':>8s} {'teacher':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['head']:10s} {r['before']:10.3f} {r['student']:8.3f} {r['teacher']:8.3f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
