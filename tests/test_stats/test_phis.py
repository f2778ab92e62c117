"""Streaming moments, PHI-S and angular dispersion against independent computations and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.stats import Moments, PhiS, angles, dispersion, mean_direction


def _data(n: int, c: int, seed: int, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((c, c)) * np.linspace(0.1, 3, c)[None, :]
    cov = a @ a.T
    mu = rng.standard_normal(c) * 5 + offset
    return rng, mu, cov


def test_merging_per_worker_moments_equals_one_pass():
    rng, mu, cov = _data(1, 48, seed=1, offset=1e4)  # a large mean: the naive formula would lose digits
    x = rng.multivariate_normal(mu, cov, size=30_000)
    one = Moments.of(x)
    workers = []
    for part in np.array_split(x, [1, 777, 5000, 12_345, 29_999]):  # uneven, one of a single row
        m = Moments.empty(48)
        for batch in np.array_split(part, 3):
            m.add(batch)
        workers.append(m)
    merged = Moments.empty(48)
    for m in reversed(workers):
        merged.merge(m)
    assert merged.count == one.count == 30_000
    assert np.abs(merged.mean - one.mean).max() / np.abs(one.mean).max() < 1e-10
    assert np.abs(merged.scatter - one.scatter).max() / np.abs(one.scatter).max() < 1e-10
    # and both agree with numpy's covariance
    assert np.allclose(one.covariance, np.cov(x, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    again = Moments.from_arrays(merged.to_arrays())
    assert again.count == merged.count and np.array_equal(again.scatter, merged.scatter)


@pytest.mark.parametrize("c", [64, 96])  # 96 = H8 ⊗ Paley II q=5
def test_phis_on_known_covariance_gives_unit_variance_on_held_out_data(c):
    rng, mu, cov = _data(1, c, seed=c)
    exact = Moments(10**9, mu, cov * 10**9)  # the true moments: isolates the transform from estimation
    phis = PhiS.fit(exact)
    assert phis.hadamard.is_hadamard
    held_out = rng.multivariate_normal(mu, cov, size=200_000)
    y = phis.apply(held_out)
    n = len(y)
    assert np.abs(y.mean(axis=0)).max() < 5 / np.sqrt(n)  # mean 0 within sampling error
    assert np.abs(y.var(axis=0) - 1).max() < 5 * np.sqrt(2 / n)  # every channel's variance 1
    # the isotropic part: total variance is C, eigenvalues of the output equal λ·α²
    assert np.isclose(np.trace(np.cov(y, rowvar=False)), c, rtol=0.02)


def test_phis_fitted_from_samples_standardizes_heavy_tailed_data():
    rng = np.random.default_rng(5)
    c = 32
    mix = rng.standard_normal((c, c))
    x = rng.standard_t(df=3, size=(300_000, c)) @ mix + 100.0
    train, test = x[:200_000], x[200_000:]
    m = Moments.empty(c)
    for batch in np.array_split(train, 17):
        m.add(batch)
    y = PhiS.fit(m).apply(test)
    # t(3) has infinite fourth moment: the sampling error of the variance is large, bound it loosely
    assert np.abs(y.mean(axis=0)).max() < 0.02 and np.abs(y.var(axis=0) - 1).max() < 0.15


def test_inverse_after_forward_is_the_identity():
    rng, mu, cov = _data(1, 128, seed=7)
    x = rng.multivariate_normal(mu, cov, size=2000)
    phis = PhiS.fit(Moments.of(x))
    back = phis.invert(phis.apply(x))
    assert np.linalg.norm(back - x) / np.linalg.norm(x) <= 1e-6
    assert np.abs(phis.rotation @ phis.inverse - np.eye(128)).max() < 1e-10


def test_constant_features_are_refused():
    with pytest.raises(ValueError, match="zero variance"):
        PhiS.fit(Moments.of(np.ones((10, 4))))


# ---- angular dispersion -------------------------------------------------------------------


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_dispersion_of_a_cone_surface_is_its_half_angle_squared():
    rng = np.random.default_rng(0)
    c, beta = 64, 0.7
    axis = _unit(rng.standard_normal(c))
    ortho = rng.standard_normal((20_000, c))
    ortho = _unit(ortho - np.outer(ortho @ axis, axis))
    y = (np.cos(beta) * axis + np.sin(beta) * ortho) * rng.uniform(0.5, 3, (20_000, 1))  # norms do not matter
    disp, mu = dispersion(lambda: np.array_split(y, 7))
    assert np.abs(mu - axis).max() < 0.02
    assert abs(disp - beta ** 2) < 1e-3


def test_dispersion_of_a_uniform_spherical_cap_in_3d():
    rng = np.random.default_rng(1)
    beta, n = 1.1, 400_000
    cos_t = rng.uniform(np.cos(beta), 1, n)  # uniform on the cap: cos θ uniform
    phi = rng.uniform(0, 2 * np.pi, n)
    sin_t = np.sqrt(1 - cos_t ** 2)
    y = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
    expected = (2 * beta * np.sin(beta) - (beta ** 2 - 2) * np.cos(beta) - 2) / (1 - np.cos(beta))
    disp, mu = dispersion(lambda: [y])
    assert np.abs(mu - [0, 0, 1]).max() < 0.01
    theta2 = np.arccos(cos_t) ** 2
    assert abs(disp - expected) < 5 * theta2.std() / np.sqrt(n)


def test_dispersion_uniform_on_the_sphere():
    rng = np.random.default_rng(2)
    for c in (3, 16):
        y = rng.standard_normal((300_000, c))
        t = np.linspace(0, np.pi, 200_001)
        w = np.sin(t) ** (c - 2)  # density of the angle to any fixed direction
        expected = np.trapezoid(t ** 2 * w, t) / np.trapezoid(w, t)
        if c == 3:
            assert abs(expected - (np.pi ** 2 - 4) / 2) < 1e-6  # the closed form
        disp, _ = dispersion(lambda: [y])
        assert abs(disp - expected) < 0.02, c


def test_angles_are_clamped_and_mean_direction_needs_a_mean():
    d = np.array([1.0, 0.0])
    assert np.allclose(angles(np.array([[2.0, 0.0], [-3.0, 0.0]]), d), [np.arccos(1 - 1e-7), np.arccos(-1 + 1e-7)])
    with pytest.raises(ValueError, match="mean summary vector is zero"):
        mean_direction([np.array([[1.0, 0.0], [-1.0, 0.0]])])
