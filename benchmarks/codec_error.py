"""Held-out error of the int8-phis codec on synthetic features, against a plain linear int8 scale.

    python benchmarks/codec_error.py [--channels 64] [--draws 5]

Correlated features (C channels, condition number in the thousands) are drawn Gaussian, multivariate
t (whole tokens heavy: t(3), t(2.5)) and element-wise t(3). The codec is calibrated on 200k tokens
with its own code (``Calibration``); the error is the relative MSE in PHI-S space on fresh draws of
100k tokens (the worst of ``--draws``). The baseline is a linear int8 scale fitted the obvious way on
the same calibration tokens: the clipping level that minimizes the calibration error, searched up to
the largest calibration value (no headroom, no knee).
"""

from __future__ import annotations

import argparse

import numpy as np

from featcache.stats.calibrate import Calibration
from featcache.store.codec.int8_phis import quantization_error
from featcache.store.codec import LEVELS, Int8Phis


def sampler(kind: str, channels: int, seed: int):
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).standard_normal((channels, channels)) * np.geomspace(1, 30, channels)

    def draw(n: int) -> np.ndarray:
        z = rng.standard_normal((n, channels))
        if kind.startswith("mvt"):
            nu = float(kind[3:])
            z = z / np.sqrt(rng.chisquare(nu, (n, 1)) / nu)
        elif kind.startswith("t"):
            z = rng.standard_t(float(kind[1:]), (n, channels))
        return 5 + z @ mixing.T

    return draw


def linear_scale(y: np.ndarray) -> float:
    v = y.ravel()
    top = np.abs(v).max()
    clips = np.geomspace(min(1.0, top), top, 200)
    return float(clips[int(np.argmin([quantization_error(v, c / LEVELS, None) for c in clips]))] / LEVELS)


def relative(y_hat: np.ndarray, y: np.ndarray) -> float:
    return float(((y_hat - y) ** 2).sum() / (y ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    c = args.channels
    print(f"relative MSE in PHI-S space, worst of {args.draws} held-out draws of 100k tokens, C = {c}")
    for kind in ("gauss", "mvt3", "t3", "mvt2.5"):
        draw = sampler(kind, c, seed=1)
        cal = Calibration(c, expected_tokens=200_000)
        sample = draw(200_000)
        cal.add(sample, np.ones((1, 4)))
        result = cal.finish()
        a, q = result["arrays"], result["quantization"]
        codec = Int8Phis(a["mean"], a["rotation"], a["inverse"], q["scale"], q["knee"])
        to_phis = lambda x: (x - a["mean"]) @ a["rotation"].astype(np.float64).T  # noqa: E731
        linear = Int8Phis(a["mean"], a["rotation"], a["inverse"], linear_scale(to_phis(sample)[:32768]), None)
        worst_codec = worst_linear = 0.0
        for _ in range(args.draws):
            x = draw(100_000)
            y = to_phis(x)
            worst_codec = max(worst_codec, relative(codec.to_phis(codec.encode_numpy(x)), y))
            worst_linear = max(worst_linear, relative(linear.to_phis(linear.encode_numpy(x)), y))
        print(f"  {kind:7s} int8-phis (knee {q['knee']}) {worst_codec:.2e}   linear scale {worst_linear:.2e}   "
              f"linear / int8-phis = {worst_linear / worst_codec:.1f}x")


if __name__ == "__main__":
    main()
