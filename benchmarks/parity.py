"""Parity benchmark (issue 25, DESIGN.md §8, ALGORITHMS.md §9): is a student distilled from the cache as good
as one distilled online, on a teacher that knows something?

Builds offline and seeded: the parity task (digits pasted on photos, :mod:`featcache.train.parity_task`), a
DINOv3 teacher of the real transformers class trained on it with a summary probe and a per-patch probe, its
cache through featcache's extract library path (f16, int8-phis and int4-pca views, statistics). Then the same
student config, steps and seed is trained four ways with ``featcache.train.train``: (a) online (the teacher on
every crop, ``data.targets=online``, targets PHI-S'd with the f16 view's statistics), (b) from the f16 cache, (c)
from the int8-phis cache, (d) from the int4-pca cache. Each is read through ``load_student`` in the teacher's space and scored on held-out
scenes: the teacher's probes (summary accuracy; dense accuracy on the digit's patches and on all patches),
cosine kNN top-1 of the summaries (train scenes vs held-out), the PHI-S error against the teacher run on the
whole scene (mean squared, in the f16 view's PHI-S space, where every channel has unit variance), and
seconds per step. The teacher's own row comes first.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/parity.py [--quick] [--threads 1] [--set crop.scale=[0.5,1.0]]

``--quick`` is a few-minute run; the default (the figures in BENCHMARKS.md) takes about 40 minutes on two CPU
threads: the teacher ~8, each student 8-11. ``--set``
overrides go to all the student runs (the recipe levers: crop scales, resolutions, loss weights, schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {  # (teacher steps, student steps, batch, train scenes, held-out scenes)
    "quick": (1500, 400, 32, 1024, 128),
    "default": (6000, 4800, 32, 4096, 256),
}
#: the student; crops, flips and loss weights are featcache's defaults. Resolutions up to the view's own
#: (128 px): with aligned crops, student cells are teacher cells shifted in whole cells.
STUDENT = ['student.size="micro"', "student.width=128", "student.depth=4", "student.num_heads=4",
           "resolution.low=[96, 128]", "optim.lr=2e-3", "optim.warmup=50"]
WAYS = (("a online", "f16", ["data.targets=\"online\""]), ("b cache f16", "f16", []),
        ("c cache int8-phis", "int8-phis", []), ("d cache int4-pca", "int4-pca", []))
CODECS = tuple(dict.fromkeys(codec for _, codec, _ in WAYS))  # the cache's views, one per codec
REFERENCE = "f16"  # the codec of the view whose PHI-S space the error is measured in (and online targets use)


def main() -> None:
    args = _args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
          flush=True)
    if args.work:  # kept: a later run with the same --work reuses its teacher and cache (recipe levers)
        report = run(Path(args.work), args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = run(Path(tmp), args)
    _print(report)
    out = Path(args.out or f"benchmarks/results/parity{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few-minute run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--steps", type=int, help="student steps")
    ap.add_argument("--train-scenes", type=int, help="training scenes in the cache (a new --work folder each)")
    ap.add_argument("--set", action="append", default=[], help="extra student config override (all the student runs)")
    ap.add_argument("--ways", default="abcd", help="which student rows to train (a, b, c, d)")
    ap.add_argument("--work", help="folder kept for the teacher and cache, reused when they are there")
    ap.add_argument("--tag", default="", help="suffix of the student run folders under --work")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/parity[-quick].json)")
    return ap.parse_args()


def run(tmp: Path, args) -> dict:
    """Task, teacher, cache, the students; the report as a dict."""
    from featcache.store.cache import Cache
    from featcache.train import parity_task as pt

    t_steps, s_steps, batch, n_train, n_test = SIZES["quick" if args.quick else "default"]
    t_steps, s_steps = args.teacher_steps or t_steps, args.steps or s_steps
    n_train = args.train_scenes or n_train
    task = pt.ParityTask(size=128, patch=16, seed=args.seed)
    t0, teacher = time.perf_counter(), tmp / "teacher"
    if not (teacher / pt.PROBES).exists():
        pt.train_teacher(task, teacher, steps=t_steps, batch=32, lr=3e-3, seed=args.seed)
    teacher_s = time.perf_counter() - t0
    scenes_csv = tmp / "scenes" / "scenes.csv"
    if not (tmp / "cache").exists():
        pt.write_scenes(task, tmp / "scenes", n_train, n_test)
    if {pt.view_key(task, c) for c in CODECS} - set(Cache.open(str(tmp / "cache")).views if (tmp / "cache").exists()
                                                    else ()):
        pt.extract_cache(tmp / "cache", scenes_csv, teacher, CODECS)  # a kept --work folder gains the views it lacks
    cache = Cache.open(str(tmp / "cache"))
    print(f"teacher trained in {teacher_s:.0f} s ({t_steps} steps); cache {list(cache.views)}", flush=True)
    ev = Evaluation(pt, task, teacher, scenes_csv, cache)
    rows = [{"way": "teacher", **ev.teacher_row()}]
    for name, codec, extra in WAYS:
        if name[0] in args.ways:
            overrides = pt.student_overrides(task, pt.view_key(task, codec), s_steps, batch, args.seed)
            folder = tmp / "-".join([name.replace(" ", "-")] + ([args.tag] if args.tag else []))
            shutil.rmtree(folder, ignore_errors=True)  # this script's own run folder from an earlier try
            rows.append({"way": name, **ev.student_row(folder,
                                                       overrides + STUDENT + extra + args.set)})
            print(rows[-1], flush=True)
    return {"task": {"size": task.size, "patch": task.patch, "train_scenes": n_train, "heldout_scenes": n_test},
            "teacher_steps": t_steps, "teacher_seconds": round(teacher_s, 1), "student_steps": s_steps,
            "batch": batch, "student": STUDENT, "overrides": args.set, "threads": args.threads, "rows": rows}


class Evaluation:
    """The held-out scenes, the probes and the reference PHI-S map; scores a row."""

    def __init__(self, pt, task, teacher: Path, scenes_csv: Path, cache):
        from featcache.store.statsio import read_stats

        self.pt, self.task, self.teacher, self.cache = pt, task, teacher, cache
        self.probes = pt.load_probes(teacher)
        self.train, self.test = (pt.read_scenes(scenes_csv, s)[1] for s in ("train", "test"))
        stats = read_stats(cache.view(pt.view_key(task, REFERENCE)))
        self.mean, self.rotation = (self._tensor(stats[k]) for k in ("mean", "rotation"))

    @staticmethod
    def _tensor(a):
        import torch

        return torch.as_tensor(a, dtype=torch.float32)

    def teacher_row(self) -> dict:
        summary, dense = self.pt.teacher_features(self.teacher, self.test.images)
        train_summary, _ = self.pt.teacher_features(self.teacher, self.train.images)
        self.reference = dense
        return self._scores(summary, dense, train_summary)

    def student_row(self, out: Path, overrides: list[str]) -> dict:
        from featcache.train import config, train
        from featcache.train.product import load_student

        cfg = config.load(None, cache=str(self.cache.root.uri), overrides=overrides)
        t0 = time.perf_counter()
        train(cfg, out)
        seconds = time.perf_counter() - t0
        student = load_student(out, which="last", space="teacher")
        summary, dense = self.pt.features_of(student, self.test.images)
        train_summary, _ = self.pt.features_of(student, self.train.images)
        return {**self._scores(summary, dense, train_summary), "s_per_step": _seconds_per_step(out, cfg),
                "train_seconds": round(seconds, 1)}

    def _scores(self, summary, dense, train_summary) -> dict:
        from featcache.train.evaluate import knn_top1

        scores = self.pt.probe_scores(self.probes, summary, dense, self.test)
        knn = knn_top1(train_summary, self.train.labels, summary, self.test.labels)
        ref = getattr(self, "reference", dense)
        err = float((self._phis(dense) - self._phis(ref)).square().mean())
        return {**{k: round(v, 4) for k, v in scores.items()}, "knn": round(knn, 4), "phis_error": round(err, 4)}

    def _phis(self, x):
        return (x.float() - self.mean) @ self.rotation.T


def _seconds_per_step(run: Path, cfg) -> float:
    """The median of the logged windows' seconds per step (the first window, with start-up, left out)."""
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines if "samples_per_s" in r][1:]
    return round(statistics.median(cfg.optim.batch_size / r for r in rates), 4) if rates else float("nan")


def _print(report: dict) -> None:
    rows = report["rows"]
    t = rows[0]
    print(f"\nparity: {report['task']}, teacher {report['teacher_steps']} steps, students {report['student_steps']} "
          f"steps of {report['batch']}, {report['threads']} thread(s); overrides {report['overrides']}")
    print(f"{'way':18s} {'summary':>8s} {'dense':>7s} {'dense_all':>9s} {'kNN':>6s} {'PHI-S err':>9s} "
          f"{'s/step':>7s} {'x teacher (sum, dense)':>22s}")
    for r in rows:
        ratio = f"{r['summary'] / t['summary']:.3f}, {r['dense'] / t['dense']:.3f}"
        print(f"{r['way']:18s} {r['summary']:8.3f} {r['dense']:7.3f} {r['dense_all']:9.3f} {r['knn']:6.3f} "
              f"{r['phis_error']:9.4f} {r.get('s_per_step', float('nan')):7.3f} {ratio:>22s}")


if __name__ == "__main__":
    main()
