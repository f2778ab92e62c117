"""FeatSharp: a fixed-resolution teacher's features at ``factor`` x its grid (ALGORITHMS.md §7).

Written from the algorithm's description in ALGORITHMS.md §7 (after Ranzinger et al., "FeatSharp:
Your Vision Model Features, Sharper", 2025), not from any released code. For a canvas of
``factor`` x the teacher's input size:

1. the global view (the canvas resized to the teacher's size) and the factor² tiles of the canvas
   go through the teacher as one batch;
2. every teacher map is put in PHI-S space (the teacher's statistics at its native size) and a
   learned de-bias map is added (it absorbs the teacher's fixed-pattern noise);
3. a joint bilateral upsampler (JBU) lifts the global map to the output grid, guided by the canvas;
4. each tile gets a learned position vector; the tiles are assembled into one map;
5. a fuser (one transformer block, attention within a window x window neighbourhood, FFN 2C → C,
   LayerScale near zero) adds its correction to the JBU map: untrained, the output is the JBU map.

The output is in PHI-S space; :meth:`FeatSharp.denormalize` returns the teacher's raw space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featcache.upsample import local


@dataclass(frozen=True)
class FeatSharpConfig:
    """The upsampler's shape; ``grid`` and ``patch`` are the teacher's native ones."""

    channels: int
    grid: tuple[int, int]
    patch: int
    factor: int = 3
    window: int = 7
    key_dim: int = 32  # the JBU's guide features
    heads: int = 8  # of the fuser's attention over 2C channels
    mlp_ratio: float = 1.0  # the fuser's FFN hidden width, in units of 2C
    layerscale: float = 1e-7  # the fuser's initial LayerScale: untrained, it returns the JBU map

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        sizes = {"channels": self.channels, "grid": min(self.grid, default=0), "patch": self.patch,
                 "key_dim": self.key_dim, "heads": self.heads}
        small = [name for name, value in sizes.items() if not value >= 1]
        if small or not self.mlp_ratio > 0:
            raise ValueError(f"{small[0]} must be >= 1, not {sizes[small[0]]}" if small else
                             f"mlp_ratio must be > 0, not {self.mlp_ratio}")
        if self.factor < 2:
            raise ValueError(f"an upsampling factor must be >= 2, not {self.factor}")
        if (2 * self.channels) % self.heads:
            raise ValueError(f"{self.heads} heads do not divide the fuser's {2 * self.channels} channels")
        local.offsets(self.window)  # odd and positive

    @property
    def out_grid(self) -> tuple[int, int]:
        return (self.grid[0] * self.factor, self.grid[1] * self.factor)

    @property
    def input_size(self) -> tuple[int, int]:
        """The teacher's native input (one tile of the canvas)."""
        return (self.grid[0] * self.patch, self.grid[1] * self.patch)

    @property
    def canvas(self) -> tuple[int, int]:
        return (self.input_size[0] * self.factor, self.input_size[1] * self.factor)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatSharpConfig":
        return cls(**d)


class JBU(nn.Module):
    """Joint bilateral upsampling, one level: U(p) = Σ_q W(p, q) · bilinear_up(F)(q) over a window.

    W = R·S / Σ R·S with S(q) = exp(−‖d_q‖² / 2σ²) on a linspace(−1, 1, window) grid and
    R(p, ·) = softmax(e^τ ⟨k_p, k_q⟩) of guide features k (1x1 conv → GELU → 1x1 conv)."""

    def __init__(self, window: int = 7, key_dim: int = 32):
        super().__init__()
        self.window = window
        self.keys = nn.Sequential(nn.Conv2d(3, key_dim, 1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1))
        self.log_sigma = nn.Parameter(torch.zeros(()))
        self.tau = nn.Parameter(torch.zeros(()))

    def spatial(self) -> torch.Tensor:
        """S(q) for every offset, (window²,)."""
        d = torch.linspace(-1, 1, self.window, device=self.tau.device)
        dist2 = torch.stack([d[dy + self.window // 2] ** 2 + d[dx + self.window // 2] ** 2
                             for dy, dx in local.offsets(self.window)])
        return torch.exp(-dist2 / (2 * torch.exp(2 * self.log_sigma)))

    def weights(self, guide: torch.Tensor) -> torch.Tensor:
        """W(p, q) for a guide (B, 3, H, W): (B, window², H, W), summing to one over q."""
        k = self.keys(guide)
        logits = local.pairwise(k, k, self.window) * torch.exp(self.tau)
        logits = logits.masked_fill(~local.inside(self.window, k.shape[-2:], k.device), float("-inf"))
        w = torch.softmax(logits, dim=1) * self.spatial().view(1, -1, 1, 1)
        return w / w.sum(dim=1, keepdim=True)

    def forward(self, low: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features → (B, C, H, W) at the guide's size."""
        up = F.interpolate(low, size=tuple(guide.shape[-2:]), mode="bilinear", align_corners=False)
        return local.gather(self.weights(guide), up, self.window)


class LocalAttention(nn.Module):
    """Multi-head attention of each cell to the cells of its window x window neighbourhood."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) → (B, H, W, D)."""
        b, h, w, d = x.shape
        q, k, v = (t.reshape(b, h, w, self.heads, d // self.heads).permute(0, 3, 4, 1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # each (B, heads, hd, H, W)
        logits = local.pairwise(q, k, self.window) / math.sqrt(d // self.heads)  # (B, heads, n, H, W)
        logits = logits.masked_fill(~local.inside(self.window, (h, w), x.device), float("-inf"))
        out = local.gather(torch.softmax(logits, dim=2), v, self.window)  # (B, heads, hd, H, W)
        return self.proj(out.permute(0, 3, 4, 1, 2).reshape(b, h, w, d))


class Fuser(nn.Module):
    """[JBU map, tiles] (2C) → one local-attention block → FFN 2C → C → JBU map + LayerScale · that."""

    def __init__(self, channels: int, heads: int, window: int, mlp_ratio: float, layerscale: float):
        super().__init__()
        dim, hidden = 2 * channels, max(1, round(2 * channels * mlp_ratio))
        self.norm1, self.attn = nn.LayerNorm(dim), LocalAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.gamma = nn.Parameter(torch.full((channels,), float(layerscale)))

    def forward(self, up: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) each → (B, C, H, W)."""
        x = torch.cat([up, tiles], dim=1).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        return up + (self.gamma * self.ffn(self.norm2(x))).permute(0, 3, 1, 2)


class FeatSharp(nn.Module):
    """The upsampler of one teacher; ``phis`` = (mean (C,), rotation R (C, C), inverse R⁻¹) of the
    teacher's PHI-S statistics at its native size: y = (x − mean) Rᵀ."""

    def __init__(self, config: FeatSharpConfig, phis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        super().__init__()
        c, (h, w), f = config.channels, config.grid, config.factor
        self.config = config
        for name, value in zip(("phis_mean", "phis_rotation", "phis_inverse"), phis):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).clone())
        self.debias = nn.Parameter(torch.zeros(c, h, w))
        self.tile_position = nn.Parameter(torch.zeros(f * f, c))
        self.jbu = JBU(config.window, config.key_dim)
        self.fuser = Fuser(c, config.heads, config.window, config.mlp_ratio, config.layerscale)

    def phis(self, raw: torch.Tensor) -> torch.Tensor:
        """Maps (N, H, W, C) of any size, raw → (N, C, H, W) in PHI-S space."""
        return ((raw.float() - self.phis_mean) @ self.phis_rotation.T).permute(0, 3, 1, 2)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Teacher maps at the native grid (N, h, w, C), raw → (N, C, h, w) in PHI-S space, de-biased."""
        return self.phis(raw) + self.debias

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in PHI-S space → (B, H, W, C) raw teacher features."""
        return y.permute(0, 2, 3, 1) @ self.phis_inverse.T + self.phis_mean

    def forward(self, global_raw: torch.Tensor, tiles_raw: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Teacher maps of the global views (B, h, w, C) and of their tiles (B·f², h, w, C, row-major
        per canvas), and the guide (B, 3, f·h, f·w) → the upsampled map (B, C, f·h, f·w), PHI-S space."""
        f = self.config.factor
        tiles = self.normalize(tiles_raw) + self.tile_position.repeat(len(global_raw), 1)[:, :, None, None]
        return self.fuser(self.jbu(self.normalize(global_raw), guide), assemble(tiles, f))

    def bilinear(self, global_raw: torch.Tensor) -> torch.Tensor:
        """The baseline: the global map (de-biased, PHI-S space) bilinearly upsampled f x."""
        return F.interpolate(self.normalize(global_raw), size=self.config.out_grid, mode="bilinear",
                             align_corners=False)


def assemble(tiles: torch.Tensor, factor: int) -> torch.Tensor:
    """(B·f², C, h, w) tiles, row-major per canvas → (B, C, f·h, f·w)."""
    n, c, h, w = tiles.shape
    b = n // (factor * factor)
    return tiles.reshape(b, factor, factor, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, factor * h, factor * w)


def split(canvas: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, f·S, f·S) canvases → (B·f², 3, S, S) tiles, row-major per canvas (``assemble``'s inverse)."""
    b, c, hh, ww = canvas.shape
    h, w = hh // factor, ww // factor
    return canvas.reshape(b, c, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(b * factor * factor, c, h, w)
