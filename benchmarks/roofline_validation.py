"""The roofline's predicted forward time against the measured one on this machine (issue 15).

    PYTHONPATH=. python benchmarks/roofline_validation.py [--batch 8] [--res 224] [--json]
    PYTHONPATH=. python benchmarks/roofline_validation.py --device cuda --teachers   # a lent GPU, bf16

The ``measured`` preset is calibrated first (a large matmul and a large copy on the device); then
for each model (students tiny, small, base and large at ``--res``, and with ``--teachers`` the three full-size
teacher presets, random weights) the analytic ops (``featcache.roofline.ops``) give a predicted time
per batch, and the forward is timed (the fastest call over 3 s after a warm-up; float32 on CPU, bf16 on CUDA).
Printed: predicted / measured per model (targets: within 25% on CPU, 20% on a GPU). The machine may
be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import use_checkout  # noqa: E402

use_checkout()  # an uninstalled checkout (a lent GPU machine) maps featcache.train like an install

from featcache import roofline  # noqa: E402
from featcache.teachers.presets import PRESETS  # noqa: E402
from featcache.train.student import StudentConfig, build_student  # noqa: E402


STUDENTS = ("tiny", "small", "base", "large")


def timed(fn, x, device: str, seconds: float = 3.0) -> float:
    with torch.inference_mode():
        return roofline.fastest(lambda: fn(x), device, seconds=seconds)


def models(args, students=STUDENTS):
    for size in students:
        cfg = StudentConfig(size=size)
        yield f"student-{size}", cfg.roofline_shape(), args.res, lambda cfg=cfg: build_student(cfg).to(args.device).eval()
    if args.teachers:
        for name, p in PRESETS.items():
            def build(p=p):
                t = p.random_teacher(args.device)
                if args.device == "cuda":
                    t.model.to(torch.bfloat16)
                return lambda x: t.extract(x, dtype=None)
            yield name, p.shape, p.size, build


def validate(args, students=STUDENTS, seconds: float = 3.0) -> dict:
    """Predicted and measured forward time of each model (``args``: device, batch, res, teachers), the
    ``measured`` hardware preset calibrated first; each forward timed as its fastest call over ``seconds``."""
    load = [round(x, 2) for x in os.getloadavg()]
    hw = roofline.measure(args.device)
    rows = []
    for name, shape, res, build in models(args, students):
        run = build()
        x = torch.randn(args.batch, 3, res, res, device=args.device)
        measured = timed(run, x, args.device, seconds)
        predicted = sum(t.seconds for t in roofline.predict(roofline.ops(shape, res, res, args.batch, hw.itemsize), hw))
        rows.append({"model": name, "resolution": res, "batch": args.batch, "predicted_s": predicted,
                     "measured_s": measured, "ratio": predicted / measured})
        del run
    return {"device": hw.name, "peak_gflops": hw.peak / 1e9, "bandwidth_gbps": hw.bandwidth / 1e9,
            "load_average": load, "models": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--teachers", action="store_true", help="also the three full-size teacher presets (GPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = validate(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['device']}: matmul {out['peak_gflops']:.1f} GFLOP/s, copy {out['bandwidth_gbps']:.1f} GB/s; "
          f"load {out['load_average']}")
    for r in out["models"]:
        print(f"  {r['model']:16s} {r['resolution']:5d} px x{r['batch']}: predicted {r['predicted_s'] * 1e3:9.1f} ms, "
              f"measured {r['measured_s'] * 1e3:9.1f} ms, predicted / measured {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
