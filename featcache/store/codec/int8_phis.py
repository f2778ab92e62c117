"""``int8-phis``: each patch feature stored in the view's PHI-S space as int8 codes.

``int8-phis`` stores each patch feature in the view's PHI-S space (ALGORITHMS.md §1), where every
channel has unit variance, as int8 codes with one scale ``s`` (and one knee ``b``) per view::

    y = (x − μ) Rᵀ,   q = clamp(round(g(y) / s), −127, 127),   g(y) = sign(y) · b · ln(1 + |y| / b)
    PHI-S floats:  ŷ = g⁻¹(s · q)            raw floats:  x̂ = ŷ R⁻ᵀ + μ

Without a knee (``b = None``) the codes are linear, ŷ = s · q. PHI-S makes every channel look alike,
so one quantizer serves them all; the knee keeps heavy-tailed features (rare tokens tens of standard
deviations out) from forcing a coarse step on everything else. Both are fitted to minimize the
measured error on the calibration sample; decoding is one table lookup per value.

μ, R and R⁻¹ are the view's frozen ``stats/`` arrays, fitted on a calibration sample before any
shard is written; the scale and the sha256 of those statistics are recorded in the view's attrs
under ``quantization``. A reader refuses to decode when the statistics no longer match that hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.store.codec.base import QUANTIZATION, Codec, PhisSource, calibrated_stats, register_codec

LEVELS = 127  # codes are -127..127: symmetric, so -q decodes to -ŷ

def compand(y, knee: float | None):
    """The code domain: ``sign(y) · b · ln(1 + |y| / b)`` (numpy or torch), identity without a knee."""
    if knee is None:
        return y
    lib = _lib(y)
    return lib.sign(y) * knee * lib.log1p(lib.abs(y) / knee)


def expand(g, knee: float | None):
    """Inverse of :func:`compand`."""
    if knee is None:
        return g
    lib = _lib(g)
    return lib.sign(g) * knee * lib.expm1(lib.abs(g) / knee)


def _lib(x):
    if isinstance(x, (np.ndarray, np.generic, float, int)):
        return np
    import torch

    return torch


# ---- fitting the scale and knee (the codec's calibration) ----------------------------------------

MAX_VALUES = 1 << 20  # values the error is evaluated on per candidate

HEADROOM = 16.0  # the largest code lies at least this far beyond the largest calibration value
KNEES = (None, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)  # in PHI-S standard deviations; None: linear codes


def quantization_error(v: np.ndarray, scale: float, knee: float | None, g: np.ndarray | None = None) -> float:
    """Mean squared error of int8 codes with ``scale`` and ``knee`` on the values ``v``
    (``g``: ``compand(v, knee)`` when the caller already has it)."""
    g = compand(v, knee) if g is None else g
    codes = np.clip(np.rint(g / scale), -LEVELS, LEVELS).astype(np.int64)
    table = expand(np.arange(-LEVELS, LEVELS + 1) * scale, knee)
    return float(np.mean((table[codes + LEVELS] - v) ** 2, dtype=np.float64))


def fit_quantizer(y: np.ndarray, seed: int = 0) -> tuple[float, float | None, float, float]:
    """(scale, knee, relative MSE, fraction of values clipped) of int8 codes for the PHI-S-space sample ``y``: for each knee, the
    largest code's value is searched from 16 to 64 times max |y| (log grid, then refined); the pair
    with the least measured error wins. The headroom matters for heavy tails: a token more extreme
    than any in the sample would otherwise be clipped, and one such token can outweigh the rest."""
    v = np.asarray(y).ravel()
    if v.size > MAX_VALUES:
        v = v[np.random.default_rng([seed, 2]).choice(v.size, MAX_VALUES, replace=False)]
    v = v.astype(np.float64)
    power = float(np.mean(v ** 2)) if v.size else 0.0
    top = float(np.abs(v).max()) if v.size else 0.0
    if power == 0.0:
        return 1.0, None, 0.0, 0.0
    best = (np.inf, 1.0, None)
    for knee in KNEES:
        g = compand(v, knee)
        steps = compand(np.geomspace(HEADROOM * top, 4 * HEADROOM * top, 40), knee) / LEVELS
        errors = [quantization_error(v, s, knee, g) for s in steps]
        k = int(np.argmin(errors))
        fine = np.linspace(steps[max(k - 1, 0)], steps[min(k + 1, len(steps) - 1)], 17)
        for s, e in zip([steps[k], *fine], [errors[k], *(quantization_error(v, s, knee, g) for s in fine)]):
            if e < best[0]:
                best = (e, float(s), knee)
    error, scale, knee = best
    clipped = float(np.mean(np.abs(compand(v, knee)) > (LEVELS + 0.5) * scale))
    return scale, knee, error / power, clipped


@register_codec
@dataclass(frozen=True)
class Int8Phis(Codec):
    """The int8-phis transform of one view: PHI-S mean and rotations, the code scale and knee.

    Rebuilt from attrs alone (:meth:`from_attrs`) it knows its scale but not the statistics' arrays;
    :meth:`open` reads them, checked against the hash the codes were written with. Without a
    scale it is uncalibrated: encoding and decoding refuse."""

    name = "int8-phis"
    dtype, summary_dtype = "int8", "float16"
    needs_calibration = True
    error_bound = 1e-3  # in PHI-S space too, on calibrated heavy-tailed features (tests/test_stats/test_codec.py)

    mean: np.ndarray | None = field(default=None, compare=False, repr=False)  # μ (C,)
    rotation: np.ndarray | None = field(default=None, compare=False, repr=False)  # R (C, C): y = (x − μ) Rᵀ
    inverse: np.ndarray | None = field(default=None, compare=False, repr=False)  # R⁻¹ (C, C): x = y R⁻ᵀ + μ
    scale: float | None = None  # PHI-S units per code step near zero; None: not calibrated yet
    knee: float | None = None  # None: linear codes; b: logarithmic beyond about |y| = b
    stats_hash: str | None = None  # the statistics μ, R, R⁻¹ came from (recorded in each commit)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Int8Phis":
        quant = attrs.get(QUANTIZATION)
        if quant is None:
            return cls()
        return cls(scale=float(quant["scale"]), knee=quant.get("knee"), stats_hash=quant.get("stats_hash"))

    @classmethod
    def open(cls, view) -> "Int8Phis":
        """The int8-phis transform of ``view``, checked against the stats hash its codes were written with."""
        return cls.from_fitted(*reversed(calibrated_stats(view, cls.name)))

    @classmethod
    def from_fitted(cls, arrays: dict[str, np.ndarray], quantization: dict) -> "Int8Phis":
        return cls(arrays["mean"], arrays["rotation"], arrays["inverse"], float(quantization["scale"]),
                   quantization.get("knee"), quantization.get("stats_hash"))

    @classmethod
    def fit(cls, tokens: np.ndarray, arrays: dict[str, np.ndarray], phis, seed: int = 0) -> tuple[dict, dict]:
        """The scale and knee that minimize the measured error of the calibration ``tokens`` in PHI-S
        space (fitted on the transform as stored, float32 R: the one the workers encode with)."""
        y = (tokens - arrays["mean"].astype(np.float32)) @ arrays["rotation"].T
        scale, knee, relative_mse, clipped = fit_quantizer(y, seed)
        return {}, {"scale": scale, "knee": knee, "levels": LEVELS, "relative_mse": relative_mse,
                    "clipped_fraction": clipped}

    def to_dict(self) -> dict:
        if not self.calibrated:
            return {"codec": self.name}
        return {"codec": self.name, QUANTIZATION: {"codec": self.name, "scale": self.scale, "knee": self.knee,
                                                   "levels": LEVELS, "stats_hash": self.stats_hash}}

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def describe(self) -> str:
        return f"{self.name} (scale {self.scale:.3g})" if self.calibrated else f"{self.name} (not calibrated)"

    def commit_info(self) -> dict:
        return {"stats_hash": self.stats_hash}

    def encode(self, x):
        """Raw features (..., C), a torch tensor on any device → int8 codes (same device). Non-finite
        values, which would round to undefined codes, become 0 (NaN) or ±127 (their rows are failed)."""
        import torch

        self._ready()
        x = torch.nan_to_num(x.float())
        if x.device not in self._on_device:  # moved to the device once, not per batch
            self._on_device[x.device] = (torch.as_tensor(self.mean, dtype=torch.float32, device=x.device),
                                         torch.as_tensor(self.rotation, dtype=torch.float32, device=x.device))
        mean, rotation = self._on_device[x.device]
        return self.codes((x - mean) @ rotation.T)

    def codes(self, y):
        """PHI-S-space values (torch) → int8 codes."""
        import torch

        return torch.clamp(torch.round(compand(y, self.knee) / self.scale), -LEVELS, LEVELS).to(torch.int8)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        self._ready()
        y = (np.asarray(x, np.float32) - self.mean.astype(np.float32)) @ self.rotation.T.astype(np.float32)
        g = compand(y, None if self.knee is None else np.float32(self.knee))
        return np.clip(np.rint(g / np.float32(self.scale)), -LEVELS, LEVELS).astype(np.int8)

    @property
    def table(self) -> np.ndarray:
        """The PHI-S value of each code, indexed by the code's byte (uint8 view of the int8)."""
        q = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
        q = np.clip(q, -LEVELS, LEVELS)  # -128 is never written
        return expand(q * self.scale, self.knee).astype(np.float32)

    def to_phis(self, q: np.ndarray, phis: PhisSource | None = None) -> np.ndarray:
        """Codes → PHI-S-space float32 (one table lookup per value; the codes are in that space already)."""
        self._ready()
        return self._table[np.asarray(q).view(np.uint8)]

    def to_raw(self, q: np.ndarray) -> np.ndarray:
        """Codes → raw float32 features."""
        return self.to_phis(q) @ self.inverse.T.astype(np.float32, copy=False) + self.mean.astype(np.float32)

    def __post_init__(self):
        object.__setattr__(self, "_table", self.table if self.calibrated else None)
        object.__setattr__(self, "_on_device", {})
