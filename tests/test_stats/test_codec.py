"""The int8-phis codec on synthetic data: calibration, the fitted quantizer, held-out error, codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.stats.calibrate import Calibration
from featcache.stats.dispersion import angles
from featcache.stats.phis import PhiS
from featcache.store.codec import LEVELS, Int8Phis, compand, expand
from featcache.store.codec.int8_phis import HEADROOM, KNEES, fit_quantizer, quantization_error

C = 64


def _mixing(seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((C, C)) * np.geomspace(1, 30, C)  # condition number in the thousands
    return a, rng.standard_normal(C) * 5


def sampler(kind: str, seed: int):
    """Correlated features: Gaussian, multivariate t (whole tokens heavy), or element-wise t."""
    a, mu = _mixing()
    rng = np.random.default_rng(seed)

    def draw(n: int) -> np.ndarray:
        z = rng.standard_normal((n, C))
        if kind.startswith("mvt"):
            nu = float(kind[3:])
            z = z / np.sqrt(rng.chisquare(nu, (n, 1)) / nu)
        elif kind.startswith("t"):
            z = rng.standard_t(float(kind[1:]), (n, C))
        return mu + z @ a.T

    return draw


def calibrated(draw, seed: int = 0):
    cal = Calibration(C, expected_tokens=200_000, seed=seed)
    rng = np.random.default_rng(99)
    for _ in range(4):
        cal.add(draw(50_000), rng.standard_normal((16, 5)))
    result = cal.finish()
    arrays, q = result["arrays"], result["quantization"]
    return Int8Phis(arrays["mean"], arrays["rotation"], arrays["inverse"], q["scale"], q["knee"]), result, cal


@pytest.mark.parametrize("kind", ["gauss", "mvt3", "t3", "mvt2.5"])
def test_held_out_relative_mse_in_phis_space_is_below_1e3(kind):
    draw = sampler(kind, seed=1)
    codec, result, _ = calibrated(draw)
    assert result["quantization"]["relative_mse"] <= 1e-3
    for _ in range(1):  # fresh data, never seen by the calibration (100,000 tokens: the bound has a wide margin)
        x = draw(100_000)
        y = (x - codec.mean) @ codec.rotation.astype(np.float64).T
        y_hat = codec.to_phis(codec.encode_numpy(x)).astype(np.float64)
        relative = ((y_hat - y) ** 2).sum() / (y ** 2).sum()
        assert relative <= 1e-3, (kind, relative)
        x_hat = codec.decode(codec.encode_numpy(x)).astype(np.float64)
        assert ((x_hat - x) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum() <= 1e-3


def test_the_search_finds_the_best_quantizer_of_a_brute_force_grid():
    y = sampler("mvt3", seed=2)(1024) @ np.eye(C)  # 65k values: the grid, not the sample, sets how close
    y = (y - y.mean(axis=0)) / y.std(axis=0)
    scale, knee, relative, clipped = fit_quantizer(y)
    assert clipped == 0.0  # the largest code lies 16x beyond the largest value
    v = y.ravel()
    top = np.abs(v).max()
    brute = min(quantization_error(v, float(compand(t, k)) / LEVELS, k) for k in KNEES
                for t in np.geomspace(HEADROOM * top, 4 * HEADROOM * top, 400))
    assert relative * np.mean(v ** 2) <= brute * 1.001
    assert quantization_error(v, scale, knee) == pytest.approx(relative * np.mean(v ** 2), rel=1e-9)


def test_calibration_statistics_are_those_of_its_tokens():
    draw = sampler("gauss", seed=3)
    cal = Calibration(C, expected_tokens=3000, seed=0)
    x = [draw(1000) for _ in range(3)]
    s = [np.random.default_rng(i).standard_normal((7, 5)) + 3 for i in range(3)]
    for a, b in zip(x, s):
        cal.add(a.reshape(10, 10, 10, C), b)
    result = cal.finish()
    everything = np.concatenate(x).astype(np.float32).astype(np.float64)  # features arrive as float32
    assert result["summary"]["tokens"] == 3000 and result["summary"]["images"] == 21
    assert np.allclose(result["arrays"]["mean"], everything.mean(axis=0), rtol=0, atol=1e-9)
    assert np.allclose(result["arrays"]["channel_std"], everything.std(axis=0), rtol=1e-9)
    phis = PhiS.fit(cal.moments)
    assert result["summary"]["alpha"] == phis.alpha
    summaries = np.concatenate(s)
    direction = summaries.sum(axis=0) / np.linalg.norm(summaries.sum(axis=0))
    assert result["summary"]["dispersion"] == pytest.approx(np.mean(angles(summaries, direction) ** 2), rel=1e-12)
    assert result["quantization"]["calibration"]["scale_tokens"] == 3000  # under SAMPLE_TOKENS: all of them


def test_codes_table_and_encoders_agree():
    codec, _, _ = calibrated(sampler("mvt3", seed=4))
    q = np.arange(-LEVELS, LEVELS + 1, dtype=np.int8)
    values = codec.to_phis(q)
    assert np.array_equal(values, expand(q.astype(np.float64) * codec.scale, codec.knee).astype(np.float32))
    assert values[LEVELS] == 0 and np.array_equal(values[::-1], -values) and np.all(np.diff(values) > 0)
    x = sampler("mvt3", seed=5)(20_000)
    by_numpy = codec.encode_numpy(x)
    by_torch = codec.encode(torch.from_numpy(x.astype(np.float32))).numpy()
    assert by_torch.dtype == np.int8 and by_numpy.min() >= -LEVELS
    differ = by_numpy != by_torch  # float32 products summed in another order: a rounding tie at most
    assert differ.mean() < 1e-4 and np.abs(by_numpy.astype(int) - by_torch).max() <= 1


def test_linear_codes_without_a_knee():
    codec = Int8Phis(np.zeros(4), np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), 0.5, None)
    x = np.array([[0.0, 0.24, -1.3, 100.0]])
    assert np.array_equal(codec.encode_numpy(x), [[0, 0, -3, 127]])
    assert np.array_equal(codec.to_phis(codec.encode_numpy(x)), np.array([[0, 0, -1.5, 63.5]], np.float32))


def test_calibration_without_any_token_is_refused():
    with pytest.raises(ValueError, match="no calibration image"):
        Calibration(C, 10).finish()
