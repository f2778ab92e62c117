"""``int4-pca``: each patch feature as its principal components, 4 bits per channel on average, a quarter of f16.

A view of C channels stores W = ⌊C/2⌋ − 1 bytes per patch token, under a quarter of f16's 2C: a float16
scale and 8(W − 2) bits of codes, shared among the principal components by their variance::

    u_j = (x − μ)·U_j / √λ_j              component j of the calibration sample's PCA (U, λ: PHI-S's own), whitened
    s = float16(√(mean_j u_j²))           the token's scale (bytes 0–1, little-endian), over the K coded components
    q_j = argmin_k |u_j / s − t_{b_j,k}|   a b_j-bit code: component j's bits, b_j ∈ 1..8, fixed per view
    raw floats:  x̂ = Σ_j s·t_{b_j,q_j} · √λ_j U_jᵀ + μ      PHI-S floats:  ŷ = (x̂ − μ) Rᵀ

The bits are allocated once, at calibration, by reverse water-filling: one bit at a time to the component
whose expected squared error it lowers most (λ_j times the drop of a Gaussian's least-squares quantizer
error from b to b + 1 bits), until the budget is spent; components left without a bit are dropped. A
steep teacher spectrum gives its leading components 6–8 bits and its tail none, which is what lets a
quarter of f16 keep most of the signal. The levels ``t_b`` (2^b of them per depth b in use) are fitted by
Lloyd's algorithm (the least-squares scalar quantizer) to the calibration tokens' ``u_j / s``.

Codes are packed in component order into one bit stream after the scale: bit i of the stream is bit
i mod 8 of byte 2 + ⌊i/8⌋, a code's least significant bit first. ``D = diag(√λ) U_Kᵀ`` (K × C) is stored
with the view's frozen statistics (``stats/``, array ``codec_basis``, covered by the statistics' hash);
the bits, the levels and that hash are recorded in the view's attrs under ``quantization``, so another
tool decodes the cache from the attrs and the statistics alone: x̂ = (s · t) @ codec_basis + mean. The
training loader reads the bytes as they are and the training device decodes them
(:meth:`Int4Pca.decode_torch`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from featcache.errors import UsageError
from featcache.store.codec.base import QUANTIZATION, Codec, PhisSource, calibrated_stats, register_codec

SCALE_BYTES = 2  # the token's float16 scale
MAX_BITS = 8
F16_MAX = 65504.0
#: the mean squared error of the least-squares b-bit quantizer of a unit Gaussian, b = 0..8 (Max, 1960):
#: what one more bit buys a component of variance λ is λ·(GAUSSIAN[b] − GAUSSIAN[b + 1])
GAUSSIAN = (1.0, 0.3634, 0.1175, 0.03454, 0.009497, 0.002499, 0.000642, 0.000163, 0.0000411)
LAYOUT = ("bytes 0-1: the token's scale s, float16 little-endian; then the codes of the components in order, "
          "bits[j] bits each, packed into one bit stream (stream bit i = bit i mod 8 of byte 2 + i // 8, "
          "least significant bit first); value_j = s * levels[bits[j]][code_j]; x = value @ codec_basis + mean")
LLOYD_VALUES = 1 << 20  # values each depth's levels are fitted on
LLOYD_ITERATIONS = 60


def budget_bits(channels: int) -> int:
    """The code bits a token of ``channels`` channels has: its ⌊C/2⌋ − 1 bytes less the scale's two."""
    return 8 * (channels // 2 - 1 - SCALE_BYTES)


def allocate_bits(eigenvalues: np.ndarray, budget: int) -> np.ndarray:
    """Bits per component (0..8) for variances ``eigenvalues``, ``budget`` in all: reverse water-filling, one
    bit at a time to the component whose expected squared error it lowers most."""
    bits = np.zeros(len(eigenvalues), dtype=np.int64)
    gains = [(-lam * (GAUSSIAN[0] - GAUSSIAN[1]), j) for j, lam in enumerate(eigenvalues) if lam > 0]
    heapq.heapify(gains)
    for _ in range(budget):
        if not gains:
            break
        _, j = heapq.heappop(gains)
        bits[j] += 1
        if bits[j] < MAX_BITS:
            b = bits[j]
            heapq.heappush(gains, (-eigenvalues[j] * (GAUSSIAN[b] - GAUSSIAN[b + 1]), j))
    return bits


def fit_levels(u: np.ndarray, count: int = 16, seed: int = 0) -> tuple[np.ndarray, float]:
    """(``count`` sorted levels, mean squared error) of the least-squares quantizer of the values ``u``
    (Lloyd's algorithm, started at the sample's quantiles; at most :data:`LLOYD_VALUES` of them)."""
    v = np.asarray(u, np.float64).ravel()
    if v.size > LLOYD_VALUES:
        v = v[np.random.default_rng([seed, 3]).choice(v.size, LLOYD_VALUES, replace=False)]
    v = np.sort(v)
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    levels = np.quantile(v, (np.arange(count) + 0.5) / count)
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
    """The int4-pca code of one view: mean, basis, PHI-S map, bits per component, levels per depth, the
    statistics' hash.

    Rebuilt from attrs alone (:meth:`from_attrs`) it knows its bits and levels but not the arrays; :meth:`open`
    reads them, checked against the hash the codes were written with. Without bits it is uncalibrated:
    encoding and decoding refuse."""

    name = "int4-pca"
    dtype, summary_dtype = "uint8", "float16"
    needs_calibration = True
    decodes_on_device = True
    error_bound = 2e-2  # 4 bits a channel on average (tests/test_store/test_codec_contract.py, test_int4_pca.py)

    mean: np.ndarray | None = field(default=None, compare=False, repr=False)  # μ (C,)
    basis: np.ndarray | None = field(default=None, compare=False, repr=False)  # D (K, C): rows √λ_j U_jᵀ
    rotation: np.ndarray | None = field(default=None, compare=False, repr=False)  # R (C, C): y = (x − μ) Rᵀ
    bits: tuple[int, ...] | None = None  # per coded component, 1..8; None: not calibrated
    levels: tuple[tuple[float, ...], ...] | None = None  # per depth 1..8: its 2^b sorted levels (empty if unused)
    stats_hash: str | None = None

    # ---- the contract ---------------------------------------------------------------------

    @classmethod
    def stored_width(cls, channels: int) -> int:
        if channels < 8:
            raise UsageError(f"{cls.name} needs 8 channels at the least (3 bytes a token, 8 bits of codes); "
                             f"a view of {channels} takes f16 or int8-phis")
        return channels // 2 - 1

    @classmethod
    def stats_bytes(cls, channels: int) -> int:
        return 4 * min(channels, budget_bits(channels)) * channels  # the float32 basis, at most C rows

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Int4Pca":
        quant = attrs.get(QUANTIZATION)
        if quant is None:
            return cls()
        return cls(bits=tuple(int(b) for b in quant["bits"]), levels=_levels(quant["levels"]),
                   stats_hash=quant.get("stats_hash"))

    @classmethod
    def open(cls, view) -> "Int4Pca":
        return cls.from_fitted(*reversed(calibrated_stats(view, cls.name)))

    @classmethod
    def from_fitted(cls, arrays: dict[str, np.ndarray], quantization: dict) -> "Int4Pca":
        return cls(arrays["mean"], arrays["codec_basis"], arrays["rotation"],
                   tuple(int(b) for b in quantization["bits"]), _levels(quantization["levels"]),
                   quantization.get("stats_hash"))

    @classmethod
    def fit(cls, tokens: np.ndarray, arrays: dict[str, np.ndarray], phis, seed: int = 0):
        """The basis (an extra statistics array), the bits and the levels for the raw calibration ``tokens``."""
        c = len(arrays["mean"])
        cls.stored_width(c)  # a view too narrow for the code: its one line
        bits = allocate_bits(phis.eigenvalues, budget_bits(c))
        kept = np.flatnonzero(bits)
        basis = (np.sqrt(phis.eigenvalues[kept])[:, None] * phis.eigenvectors[:, kept].T).astype(np.float32)
        bits = tuple(int(b) for b in bits[kept])
        u = (tokens - arrays["mean"].astype(np.float32)) @ _whitening(basis).T
        scale = _scales(u)
        w = np.divide(u, scale, out=np.zeros_like(u), where=scale > 0)
        depths = np.asarray(bits)
        levels = tuple(tuple(float(t) for t in fit_levels(w[:, depths == b], 2 ** b, seed)[0]) if (depths == b).any()
                       else () for b in range(1, MAX_BITS + 1))
        codec = cls(arrays["mean"], basis, arrays["rotation"], bits, levels)  # to measure its error here
        centred = tokens.astype(np.float64) - arrays["mean"]
        decoded = codec.decode(codec.encode_numpy(tokens)).astype(np.float64) - arrays["mean"]
        energy = max(float((centred ** 2).sum()), 1e-300)
        return {"codec_basis": basis}, {
            "bits": list(bits), "levels": {str(b): list(t) for b, t in enumerate(levels, 1) if t},
            "kept": len(bits), "layout": LAYOUT, "relative_mse": float(((decoded - centred) ** 2).sum() / energy),
            "dropped_energy": float(phis.eigenvalues[len(bits):].sum() / max(phis.eigenvalues.sum(), 1e-300))}

    def to_dict(self) -> dict:
        if not self.calibrated:
            return {"codec": self.name}
        return {"codec": self.name, QUANTIZATION: {
            "codec": self.name, "bits": list(self.bits),
            "levels": {str(b): list(t) for b, t in enumerate(self.levels, 1) if t}, "stats_hash": self.stats_hash}}

    @property
    def calibrated(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        if not self.calibrated:
            return f"{self.name} (not calibrated)"
        return f"{self.name} ({len(self.bits)} components, {self.bits[0]}..{self.bits[-1]} bits)"

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
        mean, whitening, shifts, first, masks = self._tensors(x.device, ("mean", "whitening", "shifts", "first", "masks"))
        u = (x - mean) @ whitening.T
        scale = u.square().mean(dim=-1, keepdim=True).sqrt().clamp(max=F16_MAX).to(torch.float16)
        step = scale.float()
        w = torch.where(step > 0, u / torch.where(step > 0, step, 1.0), 0.0)
        codes = torch.empty(w.shape, dtype=torch.int64, device=x.device)
        for b, columns, bounds in self._groups(x.device):
            codes[..., columns] = torch.bucketize(w[..., columns], bounds)
        shifted = codes << shifts
        stream = torch.zeros((*w.shape[:-1], self._np["width"] - SCALE_BYTES + 1), dtype=torch.int64, device=x.device)
        stream.index_add_(-1, first, shifted & 255)
        stream.index_add_(-1, first + 1, shifted >> 8)
        return torch.cat([scale.view(torch.uint8), stream[..., :-1].to(torch.uint8)], dim=-1)

    def encode_numpy(self, x: np.ndarray) -> np.ndarray:
        self._ready()
        x = np.nan_to_num(np.asarray(x, np.float32))
        u = (x - self._np["mean"]) @ self._np["whitening"].T
        scale = _scales(u)
        w = np.divide(u, scale, out=np.zeros_like(u), where=scale > 0)
        codes = np.empty(w.shape, dtype=np.uint8)
        for b, columns, bounds in self._groups(None):
            codes[..., columns] = np.searchsorted(bounds, w[..., columns])
        stream = (codes[..., self._np["bit_component"]] >> self._np["bit_position"]) & 1
        packed = np.packbits(stream, axis=-1, bitorder="little")
        return np.concatenate([scale.astype("<f2").view(np.uint8), packed], axis=-1)

    def components(self, stored: np.ndarray) -> np.ndarray:
        """Bytes (..., W) → the decoded components ``s · t`` (..., K), float32 (in units of √λ_j)."""
        self._ready()
        b = np.asarray(stored)
        stream = np.concatenate([b[..., SCALE_BYTES:], np.zeros((*b.shape[:-1], 1), np.uint8)], axis=-1).astype(np.int64)
        first = self._np["first"]
        codes = ((stream[..., first] | (stream[..., first + 1] << 8)) >> self._np["shifts"]) & self._np["masks"]
        return self._np["table"][self._np["base"] + codes] * _scale_of(b).astype(np.float32)

    def to_raw(self, stored: np.ndarray) -> np.ndarray:
        return self.components(stored) @ self._np["basis"] + self._np["mean"]

    def to_phis(self, stored: np.ndarray, phis: PhisSource | None = None) -> np.ndarray:
        """Bytes → PHI-S-space float32: the components times ``D Rᵀ`` (μ cancels)."""
        return self.components(stored) @ self._np["to_phis"]

    def decode_torch(self, stored, space: str = "raw", phis: PhisSource | None = None):
        """Bytes (..., W), a uint8 tensor on any device → float32 (..., C) in ``space`` on that device:
        two gathers of bytes, shifts and masks, one gather of levels, one scale, one matrix product."""
        import torch

        self._ready()
        if space not in ("raw", "phis"):
            return super().decode_torch(stored, space, phis)
        first, shifts, masks, table, base, basis, mean, to_phis = self._tensors(
            stored.device, ("first", "shifts", "masks", "table", "base", "basis", "mean", "to_phis"))
        scale = stored[..., :SCALE_BYTES].contiguous().view(torch.float16).float()
        stream = torch.nn.functional.pad(stored[..., SCALE_BYTES:], (0, 1)).long()
        codes = ((stream[..., first] | (stream[..., first + 1] << 8)) >> shifts) & masks
        v = table[base + codes] * scale
        return v @ to_phis if space == "phis" else v @ basis + mean

    # ---- internals ------------------------------------------------------------------------

    def _groups(self, device):
        """(depth, component indices, level boundaries) per depth in use: numpy (``device`` None) or torch
        tensors on ``device``, moved there once."""
        if device is None:
            return self._np["groups"]
        self._tensors(device, ())
        return self._on_device[device]["groups"]

    def _tensors(self, device, names: tuple[str, ...]):
        """The named arrays of :attr:`_np` as tensors on ``device``, moved there once (with the groups)."""
        import torch

        if device not in self._on_device:
            moved = {k: torch.as_tensor(v, device=device) for k, v in self._np.items() if isinstance(v, np.ndarray)}
            moved["groups"] = [(b, torch.as_tensor(columns, device=device), torch.as_tensor(bounds, device=device))
                               for b, columns, bounds in self._np["groups"]]
            self._on_device[device] = moved
        return tuple(self._on_device[device][k] for k in names)

    def __post_init__(self):
        arrays: dict = {}
        if self.calibrated and self.mean is not None:
            bits = np.asarray(self.bits, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(bits)[:-1]])
            starts = np.cumsum([0] + [len(t) for t in self.levels])  # where each depth's levels begin in the table
            basis = np.ascontiguousarray(self.basis, np.float32)
            arrays = {"mean": self.mean.astype(np.float32), "basis": basis, "whitening": _whitening(basis),
                      "first": offsets // 8, "shifts": offsets % 8, "masks": (1 << bits) - 1,
                      "bit_component": np.repeat(np.arange(len(bits)), bits),  # each stream bit's component ...
                      "bit_position": np.concatenate([np.arange(b, dtype=np.uint8) for b in bits]),  # ... its bit
                      "table": np.concatenate([np.asarray(t, np.float32) for t in self.levels]),
                      "base": starts[bits - 1].astype(np.int64),
                      "to_phis": (basis.astype(np.float64) @ self.rotation.astype(np.float64).T).astype(np.float32),
                      "width": SCALE_BYTES + (int(bits.sum()) + 7) // 8,
                      "groups": [(b, np.flatnonzero(bits == b), _bounds(self.levels[b - 1]))
                                 for b in range(1, MAX_BITS + 1) if (bits == b).any()]}
        object.__setattr__(self, "_np", arrays)
        object.__setattr__(self, "_on_device", {})


def _bounds(levels) -> np.ndarray:
    """The decision boundaries of sorted ``levels``: the midpoints between neighbours (float32)."""
    levels = np.asarray(levels, np.float32)
    return (levels[1:] + levels[:-1]) / 2


def _levels(stored: dict) -> tuple[tuple[float, ...], ...]:
    """The attrs' {depth: levels} as a tuple over depths 1..8 (empty where unused)."""
    return tuple(tuple(float(t) for t in stored.get(str(b), ())) for b in range(1, MAX_BITS + 1))


def _whitening(basis: np.ndarray) -> np.ndarray:
    """The encoding rows ``U_jᵀ / √λ_j`` from the decoding rows ``√λ_j U_jᵀ`` (orthogonal, norms √λ_j)."""
    return (basis / np.sum(basis.astype(np.float64) ** 2, axis=1, keepdims=True)).astype(np.float32)


def _scales(u: np.ndarray) -> np.ndarray:
    """Each token's scale as stored (the RMS of its whitened components rounded to float16), float32 (..., 1)."""
    rms = np.sqrt(np.mean(np.square(u, dtype=np.float32), axis=-1, keepdims=True))
    return np.minimum(rms, F16_MAX).astype(np.float16).astype(np.float32)


def _scale_of(b: np.ndarray) -> np.ndarray:
    """The float16 scale in bytes 0–1 of each token (..., 1)."""
    return np.ascontiguousarray(b[..., :SCALE_BYTES]).view("<f2")
