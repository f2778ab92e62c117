"""Hadamard matrices for PHI-S (ALGORITHMS.md §1), normalized so that H Hᵀ = I.

Constructions: Sylvester (powers of two), Paley I (order q + 1 for a prime power q ≡ 3 mod 4),
Paley II (order 2(q + 1) for a prime power q ≡ 1 mod 4), and Kronecker products of these.
``hadamard(n)`` finds a product that gives order n; where none is known it falls back to a seeded
random orthogonal matrix, which the caller must persist (it cannot be rebuilt from a name).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Construction:
    """How an order-n matrix was built: factors such as ("sylvester", 32), ("paley1", 11), or a fallback."""

    n: int
    factors: tuple[tuple[str, int], ...]  # (kind, parameter): sylvester -> order, paley1/paley2 -> q
    seed: int | None = None  # set for the random orthogonal fallback

    @property
    def is_hadamard(self) -> bool:
        return self.seed is None

    def describe(self) -> str:
        if not self.is_hadamard:
            return f"random orthogonal {self.n} (seed {self.seed}; no Hadamard construction known here)"
        names = {"sylvester": "H{}", "paley1": "Paley I q={}", "paley2": "Paley II q={}"}
        return " ⊗ ".join(names[k].format(p) for k, p in self.factors)

    def to_dict(self) -> dict:
        return {"n": self.n, "factors": [list(f) for f in self.factors], "seed": self.seed,
                "description": self.describe()}


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q ** 0.5) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, or None."""
    for p in range(2, q + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 and _is_prime(p) else None
    return None


def _paley_orders(limit: int) -> dict[int, tuple[str, int]]:
    """Order -> (kind, q) for the Paley matrices up to ``limit`` (orders that are not powers of two)."""
    out: dict[int, tuple[str, int]] = {}
    odd_prime_powers = [q for q in range(3, limit, 2) if _prime_power(q) is not None]
    for q in odd_prime_powers:  # Paley I first: of two constructions of one order, the simpler
        if q % 4 == 3 and q + 1 <= limit:
            out.setdefault(q + 1, ("paley1", q))
    for q in odd_prime_powers:
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            out.setdefault(2 * (q + 1), ("paley2", q))
    return {m: v for m, v in out.items() if m & (m - 1)}  # powers of two are Sylvester's


@lru_cache(maxsize=None)
def construction(n: int, seed: int = 0) -> Construction:
    """The construction ``hadamard(n)`` uses: a power of two times a product of Paley orders."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    two = n & -n  # largest power of two dividing n
    rest = _paley_product(n // two, _paley_table(n))
    if n in (1, 2) or rest is not None:
        factors = ((("sylvester", two),) if two > 1 else ()) + (rest or ())
        return Construction(n, factors)
    # a product can also borrow powers of two into a Paley factor (e.g. 12 = Paley I q=11 has a 4)
    for k in range(two.bit_length() - 1, -1, -1):
        head = 1 << k
        rest = _paley_product(n // head, _paley_table(n))
        if rest is not None:
            return Construction(n, ((("sylvester", head),) if head > 1 else ()) + rest)
    return Construction(n, (), seed=seed)


def _paley_table(limit: int) -> dict[int, tuple[str, int]]:
    """The Paley orders up to ``limit`` (one table for every size up to the next power of two ≥ 4096)."""
    return _paley_orders_upto(max(4096, 1 << (limit - 1).bit_length()))


@lru_cache(maxsize=None)
def _paley_orders_upto(limit: int) -> dict[int, tuple[str, int]]:
    return _paley_orders(limit)


def _paley_product(m: int, table: dict[int, tuple[str, int]]) -> tuple[tuple[str, int], ...] | None:
    """``m`` as a product of Paley orders (largest factor first), or None."""
    if m == 1:
        return ()
    for order in sorted(table, reverse=True):
        if order <= m and m % order == 0:
            rest = _paley_product(m // order, table)
            if rest is not None:
                return (table[order],) + rest
    return None


def hadamard(n: int, seed: int = 0) -> tuple[np.ndarray, Construction]:
    """An n x n float64 matrix with H Hᵀ = I (a scaled Hadamard matrix when one is constructed)."""
    c = construction(n, seed)
    if not c.is_hadamard:
        return random_orthogonal(n, seed), c
    return signs(c) / np.sqrt(n), c


def signs(c: Construction) -> np.ndarray:
    """The ±1 matrix (int8) of a Hadamard construction: the Kronecker product of its factors."""
    if not c.is_hadamard:
        raise ValueError(f"order {c.n} has no Hadamard construction here")
    h = np.ones((1, 1), dtype=np.int8)
    for kind, p in c.factors:
        h = np.kron(h, {"sylvester": sylvester, "paley1": paley1, "paley2": paley2}[kind](p))
    return h


def sylvester(n: int) -> np.ndarray:
    """The ±1 Sylvester matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, not {n}")
    h = np.ones((1, 1), dtype=np.int8)
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(a_i − a_j) over GF(q), χ the quadratic character (0 on 0).

    GF(p^k) elements are numbered by their coefficient digits in base p (polynomials over GF(p)
    modulo a monic irreducible of degree k), so subtraction is digit-wise mod p.
    """
    p, k = _prime_power(q)
    modulus = _irreducible(p, k)
    squares = {_mul(x, x, p, k, modulus) for x in range(1, q)}
    chi = np.array([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=np.int8)
    if k == 1:
        return chi[(np.arange(q)[:, None] - np.arange(q)[None, :]) % q]
    idx = np.zeros((q, q), dtype=np.int64)
    for i in range(k):  # digit-wise difference mod p, one digit at a time
        digit = (np.arange(q) // p**i) % p
        idx += ((digit[:, None] - digit[None, :]) % p) * p**i
    return chi[idx]


def _poly(x: int, p: int, k: int) -> list[int]:
    return [(x // p**i) % p for i in range(k)]


def _mul(a: int, b: int, p: int, k: int, modulus: tuple[int, ...]) -> int:
    """a·b in GF(p^k) (modulus: the k+1 coefficients of a monic irreducible, low degree first)."""
    x, y = _poly(a, p, k), _poly(b, p, k)
    prod = [0] * (2 * k - 1)
    for i, xi in enumerate(x):
        for j, yj in enumerate(y):
            prod[i + j] = (prod[i + j] + xi * yj) % p
    for d in range(2 * k - 2, k - 1, -1):  # reduce: t^d = t^(d-k) * (t^k) and t^k = -(lower terms)
        c = prod[d]
        if c:
            for i in range(k):
                prod[d - k + i] = (prod[d - k + i] - c * modulus[i]) % p
            prod[d] = 0
    return sum(prod[i] * p**i for i in range(k))


@lru_cache(maxsize=None)
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic polynomial of degree k over GF(p) without a factor of degree <= k/2."""
    if k == 1:
        return (0, 1)
    for tail in range(p**k):
        f = tuple(_poly(tail, p, k)) + (1,)
        if not any(_divides(g, f, p) for d in range(1, k // 2 + 1)
                   for g in (tuple(_poly(t, p, d)) + (1,) for t in range(p**d))):
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


def _divides(g: tuple[int, ...], f: tuple[int, ...], p: int) -> bool:
    """Whether the monic polynomial g divides f over GF(p) (coefficients low degree first)."""
    r = list(f)
    for d in range(len(r) - 1, len(g) - 2, -1):
        c = r[d]
        if c:
            for i, gi in enumerate(g):
                r[d - len(g) + 1 + i] = (r[d - len(g) + 1 + i] - c * gi) % p
    return not any(r[:len(g) - 1])


def paley1(q: int) -> np.ndarray:
    """Paley I: order q + 1 for a prime power q ≡ 3 (mod 4). H = I + S, S = [[0, 1ᵀ], [−1, Q]]."""
    if not (_prime_power(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime power q ≡ 3 (mod 4), not {q}")
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int8) + s


def paley2(q: int) -> np.ndarray:
    """Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4), from the symmetric conference matrix
    C = [[0, 1ᵀ], [1, Q]]: each 0 becomes [[1, −1], [−1, −1]], each ±1 becomes ±[[1, 1], [1, −1]]."""
    if not (_prime_power(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime power q ≡ 1 (mod 4), not {q}")
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    one = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(c, one) + np.kron((c == 0).astype(np.int8), zero)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A seeded Haar-random orthogonal matrix (QR of a Gaussian with the signs fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]
