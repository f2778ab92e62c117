"""``int4-pca``: each patch feature as its leading principal components, 4-bit codes, a quarter of f16.

A view of C channels stores W = ⌊C/2⌋ − 1 bytes per patch token, under a quarter of f16's 2C::

    v = (x − μ) Bᵀ                      the K = 2W − 4 leading PCA components, mixed (B: K × C, B Bᵀ = I)
    s = float16(√(mean v²))              the token's RMS, stored as float16 (bytes 0–1, little-endian)
    q_k = argmin_j |v_k / s − t_j|       a code 0..15 per component (bytes 2.., two per byte, low nibble first)
    raw floats:  x̂ = (s · t[q]) B + μ    PHI-S floats:  ŷ = (x̂ − μ) Rᵀ = (s · t[q]) (B Rᵀ)

``B = M U_Kᵀ``: U_K the eigenvectors of the K largest eigenvalues of the calibration sample's
covariance (PHI-S's own), M an orthonormal K × K Hadamard-type mixing (``featcache.stats.hadamard``,
a seeded orthogonal matrix where no construction is known), so every component carries the same
share of the token's energy and one scale per token serves them all. The 16 levels ``t`` are fitted
by Lloyd's algorithm (the least-squares 4-bit quantizer) to the calibration sample's ``v / s``.
Dropping the C − K = 6 (7 for odd C) least-energy components pays for the token's scale and keeps
a byte per token spare, so that a dense chunk of 15 tokens or more, its checksum and shard-index entry
included, stays within a quarter of f16's.

``B`` is stored with the view's frozen statistics (``stats/``, array ``codec_basis``, covered by the
statistics' hash); ``t``, K and that hash are recorded in the view's attrs under ``quantization``.
So another tool decodes the cache from the attrs and the statistics alone. The training loader reads
the bytes as they are and the training device decodes them (:meth:`Int4Pca.decode_torch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featcache.errors import UsageError
from featcache.store.codec.base import QUANTIZATION, Codec, PhisSource, calibrated_stats, register_codec

CODES = 16
SCALE_BYTES = 2  # the token's float16 scale
F16_MAX = 65504.0
LAYOUT = ("bytes 0-1: the token's scale s, float16 little-endian; then K 4-bit codes, two per byte, "
          "component 2j in the low nibble of byte 2 + j; value = s * levels[code]; x = value @ codec_basis + mean")
LLOYD_VALUES = 1 << 20  # values the levels are fitted on
LLOYD_ITERATIONS = 60


def kept_components(channels: int) -> int:
    """K, the components a view of ``channels`` keeps: its ⌊C/2⌋ − 1 bytes hold the scale and K/2 bytes of codes."""
    return 2 * (channels // 2 - 1 - SCALE_BYTES)


def fit_levels(u: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """(16 sorted levels, mean squared error) of the least-squares 4-bit quantizer of the values ``u``
    (Lloyd's algorithm, started at the sample's quantiles; at most :data:`LLOYD_VALUES` of them)."""
    v = np.asarray(u, np.float64).ravel()
    if v.size > LLOYD_VALUES:
        v = v[np.random.default_rng([seed, 3]).choice(v.size, LLOYD_VALUES, replace=False)]
    v = np.sort(v)
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    levels = np.quantile(v, (np.arange(CODES) + 0.5) / CODES)
    for _ in range(LLOYD_ITERATIONS):
        cuts = np.searchsorted(v, (levels[1:] + levels[:-1]) / 2)
        starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [v.size]])
        counts = stops - starts
        means = (cumulative[stops] - cumulative[starts]) / np.maximum(counts, 1)
        new = np.where(counts > 0, means, levels)
        if np.allclose(new, levels, rtol=0, atol=1e-9):
            break
        levels = np.sort(new)
    bounds = (levels[1:] + levels[:-1]) / 2
    return levels, float(np.mean((levels[np.searchsorted(bounds, v)] - v) ** 2))


@register_codec
@dataclass(frozen=True)
class Int4Pca(Codec):
    """The int4-pca code of one view: mean, basis and PHI-S map, the 16 levels, the statistics' hash.

    Rebuilt from attrs alone (:meth:`from_attrs`) it knows its levels but not the arrays; :meth:`open`
    reads them, checked against the hash the codes were written with. Without levels it is
    uncalibrated: encoding and decoding refuse."""

    name = "int4-pca"
    dtype, summary_dtype = "uint8", "float16"
    needs_calibration = True
    decodes_on_device = True
    error_bound = 2e-2  # the dropped components and 4-bit codes (tests/test_store/test_int4_pca.py)

    mean: np.ndarray | None = field(default=None, compare=False, repr=False)  # μ (C,)
    basis: np.ndarray | None = field(default=None, compare=False, repr=False)  # B (K, C), orthonormal rows
    rotation: np.ndarray | None = field(default=None, compare=False, repr=False)  # R (C, C): y = (x − μ) Rᵀ
    levels: tuple[float, ...] | None = None  # t, 16 sorted values in units of the token's scale; None: not calibrated
    stats_hash: str | None = None

    # ---- the contract ---------------------------------------------------------------------

    @classmethod
    def stored_width(cls, channels: int) -> int:
        if channels < 8:
            raise UsageError(f"{cls.name} keeps {kept_components(8)} of 8 channels at the least; "
                             f"a view of {channels} takes f16 or int8-phis")
        return channels // 2 - 1

    @classmethod
    def stats_bytes(cls, channels: int) -> int:
        return 4 * kept_components(channels) * channels  # the float32 basis

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Int4Pca":
        quant = attrs.get(QUANTIZATION)
        if quant is None:
            return cls()
        return cls(levels=tuple(float(t) for t in quant["levels"]), stats_hash=quant.get("stats_hash"))

    @classmethod
    def open(cls, view) -> "Int4Pca":
        quant, arrays = calibrated_stats(view, cls.name)
        return cls(arrays["mean"], arrays["codec_basis"], arrays["rotation"],
                   tuple(float(t) for t in quant["levels"]), quant["stats_hash"])

    @classmethod
    def fit(cls, tokens: np.ndarray, arrays: dict[str, np.ndarray], phis, seed: int = 0):
        """The basis (an extra statistics array) and the levels for the raw calibration ``tokens``."""
        from featcache.stats.hadamard import hadamard

        c = len(arrays["mean"])
        cls.stored_width(c)  # a view too narrow for the code: its one line
        k = kept_components(c)
        mixing = hadamard(k, seed)[0]
        basis = (mixing @ phis.eigenvectors[:, :k].T).astype(np.float32)
        v = (tokens - arrays["mean"].astype(np.float32)) @ basis.T
        scale = _scales(v)
        u = np.divide(v, scale, out=np.zeros_like(v), where=scale > 0)
        levels, error = fit_levels(u, seed)
        decoded = levels[np.searchsorted((levels[1:] + levels[:-1]) / 2, u)] * scale
        centred = tokens.astype(np.float64) - arrays["mean"]
        relative = float((((decoded.astype(np.float64) @ basis) - centred) ** 2).sum() / max((centred ** 2).sum(), 1e-300))
        return {"codec_basis": basis}, {"levels": [float(t) for t in levels], "kept": k, "layout": LAYOUT,
                                        "relative_mse": relative,
                                        "dropped_energy": float(phis.eigenvalues[k:].sum() / phis.eigenvalues.sum())}

    def to_dict(self) -> dict:
        if not self.calibrated:
            return {"codec": self.name}
        return {"codec": self.name, QUANTIZATION: {"codec": self.name, "levels": list(self.levels),
                                                   "stats_hash": self.stats_hash}}

    @property
    def calibrated(self) -> bool:
        return self.levels is not None

    def describe(self) -> str:
        if not self.calibrated:
            return f"{self.name} (not calibrated)"
        return f"{self.name} (4-bit codes, levels {self.levels[0]:.3g}..{self.levels[-1]:.3g})"

    def commit_info(self) -> dict:
        return {"stats_hash": self.stats_hash}

    @classmethod
    def nonfinite_tokens(cls, stored: np.ndarray) -> np.ndarray:
        return ~np.isfinite(_scale_of(np.asarray(stored)))[..., 0]

    # ---- values ---------------------------------------------------------------------------

    def encode(self, x):
        """Raw features (..., C), a torch tensor on any device → (..., W) bytes (same device)."""
        import torch

        self._ready()
        x = torch.nan_to_num(x.float())
        mean, basis, bounds = self._tensors(x.device, ("mean", "basis", "bounds"))
        v = (x - mean) @ basis.T
        scale = v.square().mean(dim=-1, keepdim=True).sqrt().clamp(max=F16_MAX).to(torch.float16)
        step = scale.float()
        u = torch.where(step > 0, v / torch.where(step > 0, step, 1.0), 0.0)
        codes = torch.bucketize(u, bounds).to(torch.uint8)
        return torch.cat([scale.view(torch.uint8), codes[..., 0::2] | (codes[..., 1::2] << 4)], dim=-1)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        self._ready()
        x = np.nan_to_num(np.asarray(x, np.float32))
        v = (x - self.mean.astype(np.float32)) @ self.basis.T
        scale = _scales(v)
        u = np.divide(v, scale, out=np.zeros_like(v), where=scale > 0)
        codes = np.searchsorted(self._np["bounds"], u).astype(np.uint8)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return np.concatenate([scale.astype("<f2").view(np.uint8), packed], axis=-1)

    def components(self, stored: np.ndarray) -> np.ndarray:
        """Bytes (..., W) → the decoded components ``s · t[q]`` (..., K), float32."""
        self._ready()
        b = np.asarray(stored)
        pairs = self._np["pairs"][b[..., SCALE_BYTES:]]  # (..., K/2, 2): low nibble, high nibble
        return pairs.reshape(*b.shape[:-1], -1) * _scale_of(b).astype(np.float32)

    def to_raw(self, stored: np.ndarray) -> np.ndarray:
        return self.components(stored) @ self.basis + self.mean.astype(np.float32)

    def to_phis(self, stored: np.ndarray, phis: PhisSource | None = None) -> np.ndarray:
        """Bytes → PHI-S-space float32: the components times ``B Rᵀ`` (μ cancels)."""
        return self.components(stored) @ self._np["to_phis"]

    def decode_torch(self, stored, space: str = "raw", phis: PhisSource | None = None):
        """Bytes (..., W), a uint8 tensor on any device → float32 (..., C) in ``space`` on that device:
        one gather of 256 byte values, one scale, one matrix product."""
        import torch

        self._ready()
        if space not in ("raw", "phis"):
            return super().decode_torch(stored, space, phis)
        pairs, basis, mean, to_phis = self._tensors(stored.device, ("pairs", "basis", "mean", "to_phis"))
        scale = stored[..., :SCALE_BYTES].contiguous().view(torch.float16).float()
        v = pairs[stored[..., SCALE_BYTES:].long()].flatten(-2) * scale
        return v @ to_phis if space == "phis" else v @ basis + mean

    # ---- internals ------------------------------------------------------------------------

    def _tensors(self, device, names: tuple[str, ...]):
        """The named float32 arrays of :attr:`_np` as tensors on ``device``, moved there once."""
        import torch

        if device not in self._on_device:
            self._on_device[device] = {k: torch.as_tensor(v, device=device) for k, v in self._np.items()}
        return tuple(self._on_device[device][k] for k in names)

    def __post_init__(self):
        arrays = {}
        if self.calibrated and self.mean is not None:
            levels = np.asarray(self.levels, np.float32)
            nibbles = np.arange(256)
            arrays = {"mean": self.mean.astype(np.float32), "basis": np.ascontiguousarray(self.basis, np.float32),
                      "bounds": (levels[1:] + levels[:-1]) / 2,
                      "pairs": np.stack([levels[nibbles & 15], levels[nibbles >> 4]], axis=1),
                      "to_phis": (self.basis.astype(np.float64) @ self.rotation.astype(np.float64).T).astype(np.float32)}
        object.__setattr__(self, "_np", arrays)
        object.__setattr__(self, "_on_device", {})


def _scales(v: np.ndarray) -> np.ndarray:
    """Each token's scale as stored (its RMS rounded to float16), float32 (..., 1)."""
    rms = np.sqrt(np.mean(np.square(v, dtype=np.float32), axis=-1, keepdims=True))
    return np.minimum(rms, F16_MAX).astype(np.float16).astype(np.float32)


def _scale_of(b: np.ndarray) -> np.ndarray:
    """The float16 scale in bytes 0–1 of each token (..., 1)."""
    return np.ascontiguousarray(b[..., :SCALE_BYTES]).view("<f2")
