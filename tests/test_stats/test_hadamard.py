"""Hadamard constructions: H Hᵀ = I for the sizes PHI-S needs and every covered multiple of 4 to 4096."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.stats.hadamard import construction, hadamard, paley1, paley2, signs, sylvester

REQUIRED = [256, 384, 512, 768, 1024, 1152, 1280, 1536, 2048, 4096]


def _check(h: np.ndarray) -> float:
    """max |H Hᵀ − I| of a float matrix that must be a scaled ±1 matrix."""
    n = len(h)
    assert np.allclose(np.abs(h), 1 / np.sqrt(n), rtol=0, atol=1e-12)
    return float(np.abs(h @ h.T - np.eye(n)).max())


def _check_signs(s: np.ndarray, rows: np.ndarray | None = None) -> bool:
    """S Sᵀ == n I exactly for a ±1 matrix (over ``rows`` of the product when given)."""
    n = len(s)
    assert s.dtype == np.int8 and bool((np.abs(s) == 1).all())
    f = s.astype(np.float32)  # integer sums below 2**24: float32 is exact
    sub = f if rows is None else f[rows]
    target = (np.eye(n) if rows is None else np.eye(n)[rows]) * n
    return bool(np.array_equal(sub @ f.T, target))


@pytest.mark.parametrize("n", REQUIRED)
def test_required_sizes_are_true_hadamard_matrices(n):
    h, c = hadamard(n)
    assert c.is_hadamard, c.describe()
    assert _check(h) < 1e-12


def test_the_named_constructions_of_the_algorithms_note():
    assert construction(1152).describe() == "H32 ⊗ Paley II q=17"
    assert construction(1280).describe() == "H64 ⊗ Paley I q=19"
    assert construction(1536).describe() == "H128 ⊗ Paley I q=11"


@pytest.mark.parametrize("kind, q", [("paley1", 3), ("paley1", 11), ("paley1", 19), ("paley1", 27), ("paley1", 243),
                                     ("paley2", 5), ("paley2", 13), ("paley2", 17), ("paley2", 9), ("paley2", 25)])
def test_paley_matrices_are_integer_hadamard(kind, q):
    h = (paley1 if kind == "paley1" else paley2)(q)
    assert len(h) == (q + 1 if kind == "paley1" else 2 * (q + 1))
    assert _check_signs(h)


def test_sylvester_refuses_other_orders():
    assert _check_signs(sylvester(8))
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester(12)


@pytest.mark.slow
def test_every_multiple_of_4_up_to_4096_is_covered_or_falls_back():
    """Which sizes have a construction: all 1024 multiples of 4 up to 4096. Their ±1 matrices are
    checked whole up to 1024 and on a seeded sample of 48 sizes above (each 4 random rows against the
    whole matrix; the teachers' sizes are checked whole above): building every large one costs
    ~30 s and proves little more, the constructions above 1024 being the same few kinds."""
    rng = np.random.default_rng(0)
    fallbacks = [n for n in range(4, 4097, 4) if not construction(n).is_hadamard]
    covered = [n for n in range(4, 4097, 4) if n not in fallbacks]
    large = [n for n in covered if n > 1024]
    for n in [n for n in covered if n <= 1024] + sorted(rng.choice(large, 48, replace=False).tolist()):
        c = construction(n)
        rows = None if n <= 256 else rng.choice(n, 4, replace=False)
        assert _check_signs(signs(c), rows), (n, c.describe())
    print(f"\nHadamard constructions cover {len(covered)} of the 1024 multiples of 4 up to 4096; "
          f"{len(fallbacks)} fall back to a seeded random orthogonal matrix, the first: {fallbacks[:12]}")
    assert not set(REQUIRED) & set(fallbacks)
    assert fallbacks[:4] == [92, 116, 156, 172]  # 92 = 4·23: no Paley order fits (Williamson's does)


def test_fallback_is_a_seeded_orthogonal_matrix_and_says_so():
    h, c = hadamard(92, seed=3)
    assert not c.is_hadamard and c.seed == 3 and "random orthogonal" in c.describe()
    assert np.abs(h @ h.T - np.eye(92)).max() < 1e-12
    assert np.array_equal(h, hadamard(92, seed=3)[0]) and not np.array_equal(h, hadamard(92, seed=4)[0])
    assert c.to_dict()["seed"] == 3
