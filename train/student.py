"""The student ViT distilled from the cache (DESIGN.md §5), after C-RADIOv4 / AM-RADIO.

A pre-norm ViT with RADIO's any-resolution position encoding (CPE, :func:`position_table`: a learned table on
``pos_grid``), one CLS token per summary teacher followed by register tokens, optional ViTDet windowed attention
(Li et al. 2022) with a few global blocks, and one pair of adaptor MLPs per teacher (summary head on its CLS
token, feature head on the patch tokens).

CPE follows NVlabs/RADIO ``radio/vit_patch_generator.py`` (``ViTPatchGenerator._get_pos_embeddings``): at the
table's own grid the table is used as it is; otherwise, at inference, the table is resized bilinearly (corners
aligned) to a square of the grid's longest side and its top-left h x w is taken; in training each image gets a
random rectangle of the table (area 10-100%, aspect 3/4-4/3, anywhere it fits) sampled bilinearly on h x w points,
so the student does not tie features to absolute positions.

Token layout: ``[CLS of each summary head, in head order] + [registers] + [h*w patch tokens, row-major]``.
The prefix tokens (CLS + registers) sit the windowed blocks out, as RADIO's ``radio/vitdet.py`` (``ViTDetHook``)
takes them out there: they leave a run of windowed blocks as they entered it, and a patch token there attends to
its own window only. So windows exchange information only in global blocks, where every token attends to all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import UsageError
from featcache.roofline import VitShape, block_flops


@dataclass(frozen=True)
class VitSize:
    """Backbone dimensions: token width, number of blocks, attention heads, MLP hidden / width."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


SIZES: dict[str, VitSize] = {
    "micro": VitSize(64, 2, 2),  # for tests
    "tiny": VitSize(192, 12, 3),
    "small": VitSize(384, 12, 6),
    "base": VitSize(768, 12, 12),
    "large": VitSize(1024, 24, 16),
    "huge": VitSize(1280, 32, 16),
}
WINDOW_RANGE = (6, 32)  # allowed vitdet_window_size, in tokens per side
CPE_MIN_SCALE = math.sqrt(0.1)  # RADIO: a training crop covers at least 10% of the table's area
CPE_LOG_ASPECT = math.log(4 / 3)  # and its aspect lies in [3/4, 4/3], log-uniform


@dataclass(frozen=True)
class TeacherHead:
    """One teacher the student imitates: its dense channels and summary channels (0 = none of that kind)."""

    name: str
    dense_channels: int
    summary_channels: int = 0

    def __post_init__(self):
        if not self.name or "." in self.name:
            raise UsageError(f"teacher head name {self.name!r} must be non-empty and contain no '.'")
        if min(self.dense_channels, self.summary_channels) < 0 or self.dense_channels + self.summary_channels == 0:
            raise UsageError(f"teacher head {self.name!r} needs dense_channels or summary_channels > 0 "
                             f"(got {self.dense_channels}, {self.summary_channels})")


@dataclass
class StudentConfig:
    """Everything that decides the student's architecture; ``to_dict`` is what checkpoints and configs hold.

    ``width``/``depth``/``num_heads``/``mlp_ratio`` override the named ``size``. ``global_blocks`` (windowed
    models only) defaults to the last block of each quarter of the depth; ``()`` means no global block.
    ``pos_grid`` is the grid of the CPE table (RADIO's largest input / patch); other grids resize and crop it.
    """

    size: str = "base"
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    patch: int = 16
    registers: int = 4
    pos_grid: tuple[int, int] = (32, 32)
    vitdet_window_size: int | None = None
    global_blocks: tuple[int, ...] | None = None
    drop_path: float = 0.0
    heads: list[TeacherHead] = field(default_factory=list)
    adaptor_hidden: int | None = None

    def __post_init__(self):
        self.pos_grid = tuple(self.pos_grid)
        if self.global_blocks is not None:
            self.global_blocks = tuple(self.global_blocks)
        if self.size not in SIZES:
            raise UsageError(f"unknown student size {self.size!r}; known sizes: {', '.join(SIZES)}")
        self._check_window()
        vit = self.vit()
        if min(vit.width, vit.depth, vit.heads, self.patch, *self.pos_grid) < 1 or vit.width % vit.heads:
            raise UsageError(f"student width {vit.width} must be a positive multiple of num_heads {vit.heads}; "
                             f"depth {vit.depth}, patch {self.patch} and pos_grid {self.pos_grid} must be positive")
        if self.registers < 0 or not 0 <= self.drop_path < 1 or (self.adaptor_hidden or 1) < 1 or vit.mlp_ratio <= 0:
            raise UsageError(f"need registers >= 0 (got {self.registers}), adaptor_hidden >= 1 "
                             f"({self.adaptor_hidden}), mlp_ratio > 0 ({vit.mlp_ratio}), drop_path in [0, 1) "
                             f"({self.drop_path})")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise UsageError(f"teacher head names must be unique, got {names}")

    def _check_window(self) -> None:
        ws, lo, hi = self.vitdet_window_size, *WINDOW_RANGE
        if ws is None:
            if self.global_blocks is not None:
                raise UsageError("global_blocks needs vitdet_window_size (without windows every block is global)")
            return
        if not lo <= ws <= hi:
            raise UsageError(f"vitdet_window_size {ws} is outside {lo}-{hi} tokens")
        depth = self.vit().depth
        if any(not 0 <= i < depth for i in self.global_blocks or ()):
            raise UsageError(f"global_blocks {self.global_blocks} must be block indices in 0..{depth - 1}")

    def vit(self) -> VitSize:
        """The backbone dimensions after the overrides."""
        overrides = {"width": self.width, "depth": self.depth, "heads": self.num_heads, "mlp_ratio": self.mlp_ratio}
        return dataclasses.replace(SIZES[self.size], **{k: v for k, v in overrides.items() if v is not None})

    def roofline_shape(self) -> VitShape:
        """The backbone as ``featcache.roofline`` models it (prefix = one CLS per summary head + registers;
        a windowed block's queries attend over their window; the roofline counts the few prefix tokens in
        windowed blocks too, which the student sets aside there: under 1% at the sizes it models)."""
        vit, ws = self.vit(), self.vitdet_window_size
        prefix = sum(1 for h in self.heads if h.summary_channels) + self.registers
        return VitShape(vit.width, int(vit.width * vit.mlp_ratio), vit.depth, self.patch, prefix_tokens=prefix,
                        window=None if ws is None else ws * ws,
                        global_layers=len(self.global_block_indices()) if ws is not None else 0)

    def global_block_indices(self) -> tuple[int, ...]:
        """Blocks that attend over all tokens: all of them without windows."""
        depth = self.vit().depth
        if self.vitdet_window_size is None:
            return tuple(range(depth))
        if self.global_blocks is not None:
            return tuple(sorted(set(self.global_blocks)))
        return tuple(sorted({max(0, (q + 1) * depth // 4 - 1) for q in range(4)}))

    def to_dict(self) -> dict:
        """JSON/TOML-ready: tuples become lists, unset (None) fields are left out."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["pos_grid"] = list(self.pos_grid)
        if self.global_blocks is not None:
            out["global_blocks"] = list(self.global_blocks)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> StudentConfig:
        """Inverse of ``to_dict``; an unknown key is an error, not ignored."""
        _check_keys(cls, data, "student config")
        heads = []
        for h in data.get("heads", []):
            _check_keys(TeacherHead, h, "teacher head")
            heads.append(TeacherHead(**h))
        return cls(**{**data, "heads": heads})


def _check_keys(cls, data: dict, what: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UsageError(f"unknown {what} keys {unknown}; known keys: {', '.join(known)}")


@dataclass
class StudentOutput:
    """``summary[name]`` (B, Cs) per summary head, ``dense[name]`` (B, h, w, C) per dense head,
    ``features`` (B, h, w, width) the normed patch tokens before the adaptors, ``grid`` = (h, w)."""

    summary: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    features: torch.Tensor
    grid: tuple[int, int]


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


def _windows(t: torch.Tensor, h: int, w: int, ws: int) -> torch.Tensor:
    """(..., B, H, h*w, c) -> (..., B*nW, H, ws*ws, c): non-overlapping ws x ws windows as a batch."""
    *lead, b, nh, _, c = t.shape
    t = t.reshape(-1, nh, h // ws, ws, w // ws, ws, c).permute(0, 2, 4, 1, 3, 5, 6)  # (., h/ws, w/ws, H, ws, ws, c)
    return t.reshape(*lead, b * (h // ws) * (w // ws), nh, ws * ws, c)


def _unwindows(t: torch.Tensor, b: int, h: int, w: int, ws: int) -> torch.Tensor:
    """Inverse of ``_windows`` for one tensor: (B*nW, H, ws*ws, c) -> (B, H, h*w, c)."""
    _, nh, _, c = t.shape
    t = t.reshape(b, h // ws, w // ws, nh, ws, ws, c).permute(0, 3, 1, 4, 2, 5, 6)
    return t.reshape(b, nh, h * w, c)


def position_table(table: torch.Tensor, grid: tuple[int, int], training: bool, batch: int,
                   share: tuple[int, int] | None = None) -> torch.Tensor:
    """RADIO's CPE: the learned ``table`` (1, D, H, W) for a ``grid`` of h x w tokens, as (1 or ``batch``, D, h, w).

    At the table's own grid, the table; at inference, the table resized bilinearly to a square of side
    max(h, w) and its top-left h x w; in training, :func:`_random_crop` per image (see the module docstring;
    ``share``: :func:`_drawn_rows`)."""
    if tuple(table.shape[-2:]) == tuple(grid):
        return table
    if training:
        return _random_crop(table, grid, batch, share)
    side = max(grid)
    square = F.interpolate(table.float(), size=(side, side), mode="bilinear", align_corners=True)
    return square[..., :grid[0], :grid[1]].to(table.dtype)


def _drawn_rows(batch: int, share: tuple[int, int] | None) -> tuple[int, slice]:
    """(rows a random draw covers, the rows of this batch): a data-parallel rank's batch is rows [first, first +
    batch) of a global batch (``share`` = (first, global rows)); it draws for the whole global batch and keeps its
    rows, so the ranks together draw what one process draws for the global batch (``featcache.train.distributed``)."""
    if share is None:
        return batch, slice(None)
    first, total = share
    return total, slice(first, first + batch)


def _random_crop(table: torch.Tensor, grid: tuple[int, int], batch: int,
                 share: tuple[int, int] | None = None) -> torch.Tensor:
    """Per image, a rectangle of ``table`` (area scale² with scale uniform in [√0.1, 1], aspect log-uniform in
    [3/4, 4/3], clamped to the table, its corner uniform where it fits) sampled bilinearly on h x w points from
    corner to corner. Drawn from torch's global RNG on the table's device (scales, aspects, corners, as RADIO
    draws them), so a seeded run, and a resumed one, draws the same crops."""
    dev, (h, w) = table.device, grid
    drawn, rows = _drawn_rows(batch, share)
    scale = torch.rand(drawn, device=dev) * (1 - CPE_MIN_SCALE) + CPE_MIN_SCALE
    aspect = torch.exp(torch.rand(drawn, device=dev) * 2 * CPE_LOG_ASPECT - CPE_LOG_ASPECT)
    size = torch.stack([scale * aspect, scale / aspect], dim=-1).clamp(0, 1)  # (B, 2): x, y in table fractions
    corner = (torch.rand(drawn, 2, device=dev) * (1 - size))[rows]
    size = size[rows]
    xs = corner[:, 0, None] + size[:, 0, None] * torch.linspace(0, 1, w, device=dev)  # (B, w)
    ys = corner[:, 1, None] + size[:, 1, None] * torch.linspace(0, 1, h, device=dev)  # (B, h)
    points = torch.stack([xs[:, None, :].expand(-1, h, -1), ys[:, :, None].expand(-1, -1, w)], dim=-1)
    return F.grid_sample(table.float().expand(batch, -1, -1, -1), points * 2 - 1, mode="bilinear",
                         padding_mode="zeros", align_corners=True).to(table.dtype)


class Attention(nn.Module):
    """Multi-head self-attention, global or ViTDet-windowed (``window`` = tokens per window side; a windowed
    attention takes the h*w patch tokens only)."""

    def __init__(self, dim: int, heads: int, window: int | None):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, c)
        out = F.scaled_dot_product_attention(*qkv) if self.window is None else self._windowed(qkv, grid)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def _windowed(self, qkv: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (h, w), ws, b = grid, self.window, qkv.shape[1]
        return _unwindows(F.scaled_dot_product_attention(*_windows(qkv, h, w, ws)), b, h, w, ws)


def _drop_path(x: torch.Tensor, p: float, training: bool, share: tuple[int, int] | None = None) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` (``share``:
    :func:`_drawn_rows`)."""
    if p == 0 or not training:
        return x
    drawn, rows = _drawn_rows(x.shape[0], share)
    keep = x.new_empty(drawn, *(1,) * (x.ndim - 1)).bernoulli_(1 - p)[rows]
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, drop_path: float, window: int | None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, window)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden, dim)
        self.drop_path = drop_path
        self.batch_share: tuple[int, int] | None = None  # set by Student.batch_share

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x), grid), self.drop_path, self.training, self.batch_share)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, self.batch_share)


def _valid_sides(height: int, width: int, m: int) -> str:
    """'AxB or CxD': the nearest sizes below and above whose sides are multiples of ``m``."""
    down = (height // m * m, width // m * m)
    up = (-(-height // m) * m, -(-width // m) * m)
    sizes = [f"{a}x{b}" for a, b in (down, up) if min(a, b) > 0]
    return " or ".join(dict.fromkeys(sizes))


class Student(nn.Module):
    """The student ViT with its per-teacher adaptors; see the module docstring for the token layout."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg, vit = cfg, cfg.vit()
        d = vit.width
        self.summary_names = [h.name for h in cfg.heads if h.summary_channels > 0]
        self.patch_embed = nn.Conv2d(3, d, cfg.patch, cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, d, *cfg.pos_grid))
        self.cls_tokens = nn.Parameter(torch.zeros(1, len(self.summary_names), d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, d))
        hidden, glob = int(d * vit.mlp_ratio), cfg.global_block_indices()
        rates = [cfg.drop_path * i / max(vit.depth - 1, 1) for i in range(vit.depth)]  # stochastic depth ramp
        self.blocks = nn.ModuleList(
            Block(d, vit.heads, hidden, rates[i], None if i in glob else cfg.vitdet_window_size)
            for i in range(vit.depth))
        self.norm = nn.LayerNorm(d)
        a = cfg.adaptor_hidden or d
        self.summary_adaptors = nn.ModuleDict({h.name: Mlp(d, a, h.summary_channels)
                                               for h in cfg.heads if h.summary_channels > 0})
        self.dense_adaptors = nn.ModuleDict({h.name: Mlp(d, a, h.dense_channels)
                                             for h in cfg.heads if h.dense_channels > 0})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) tokens, position table and linear weights, zero biases (as timm's ViT)."""
        for p in (self.pos_embed, self.cls_tokens, self.register_tokens):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def batch_share(self) -> tuple[int, int] | None:
        """On a data-parallel rank, (first row, global rows): its batches are that share of a global batch, and
        its random draws in training (the CPE's crops, drop-path) are the global batch's rows of that share;
        None (one process) draws for the batch itself."""
        return self._share

    @batch_share.setter
    def batch_share(self, share: tuple[int, int] | None) -> None:
        for block in self.blocks:
            block.batch_share = share
        self._share = share

    _share: tuple[int, int] | None = None

    @property
    def num_prefix(self) -> int:
        """CLS tokens + register tokens."""
        return self.cls_tokens.shape[1] + self.register_tokens.shape[1]

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) patch tokens for an input of ``height`` x ``width`` pixels; a UsageError if it does not tile."""
        p, ws = self.cfg.patch, self.cfg.vitdet_window_size
        if height % p or width % p:
            raise UsageError(f"input {height}x{width} px is not a multiple of the patch {p} px; "
                             f"sizes that work: {_valid_sides(height, width, p)}")
        if ws and (height % (p * ws) or width % (p * ws)):
            raise UsageError(f"input {height}x{width} px: the window size times the patch must divide the input "
                             f"(vitdet_window_size {ws} x patch {p} = {ws * p} px); "
                             f"sizes that work: {_valid_sides(height, width, ws * p)}")
        return height // p, width // p

    def forward(self, pixels: torch.Tensor) -> StudentOutput:
        """Normalized pixels (B, 3, H, W) -> per-teacher summaries and dense maps, and the backbone features."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UsageError(f"student input must be (B, 3, H, W), got {tuple(pixels.shape)}")
        grid = self.token_grid(*pixels.shape[-2:])
        x = self._blocks(self._embed(pixels, grid), grid)
        return self._adapt(self.norm(x), grid)

    def _blocks(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The blocks in order; the prefix is set aside during each run of windowed blocks (RADIO's ViTDet)."""
        p, aside = self.num_prefix, None
        for block in self.blocks:
            windowed = block.attn.window is not None
            if windowed and aside is None:
                aside, x = x[:, :p], x[:, p:]
            elif not windowed and aside is not None:
                x, aside = torch.cat([aside, x], dim=1), None
            x = block(x, grid)
        return x if aside is None else torch.cat([aside, x], dim=1)

    def _embed(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (B, D, h, w)
        x = (x + position_table(self.pos_embed, grid, self.training, x.shape[0], self._share)).flatten(2).transpose(1, 2)
        # each token expanded on its own: its gradient is then a tensor of its own shape (DDP's buckets copy it as is)
        prefix = torch.cat([t.expand(x.shape[0], -1, -1) for t in (self.cls_tokens, self.register_tokens)], dim=1)
        return torch.cat([prefix.to(x.dtype), x], dim=1)

    def _adapt(self, x: torch.Tensor, grid: tuple[int, int]) -> StudentOutput:
        features = x[:, self.num_prefix:].unflatten(1, grid)
        summary = {name: mlp(x[:, i]) for i, (name, mlp) in enumerate(self.summary_adaptors.items())}
        dense = {name: mlp(features) for name, mlp in self.dense_adaptors.items()}
        return StudentOutput(summary, dense, features, grid)

    def num_flops(self, height: int, width: int) -> int:
        """Analytic forward FLOPs for one image (multiply-add = 2; matmuls and the patch convolution only)."""
        h, w = self.token_grid(height, width)
        vit, n, p = self.cfg.vit(), h * w, self.num_prefix
        d, t, hidden, a = vit.width, h * w + p, int(vit.width * vit.mlp_ratio), self.cfg.adaptor_hidden or vit.width
        total = 2 * n * 3 * self.cfg.patch**2 * d
        for block in self.blocks:
            ws = block.attn.window  # a windowed block: the patch tokens alone, each over its window
            total += block_flops(t, d, hidden, False, t) if ws is None else block_flops(n, d, hidden, False, ws * ws)
        for head in self.cfg.heads:
            total += 2 * a * (d + head.summary_channels) if head.summary_channels else 0
            total += 2 * n * a * (d + head.dense_channels) if head.dense_channels else 0
        return total


def build_student(cfg: StudentConfig) -> Student:
    """The one constructor of a student from its config."""
    return Student(cfg)


__all__ = ["SIZES", "VitSize", "TeacherHead", "StudentConfig", "StudentOutput", "Student", "build_student",
           "position_table"]
