"""Coordinate math of DESIGN.md §3: boxes, student crops, F_{S→T}, windows and the crop lookup.

Boxes are ``(x0, y0, x1, y1)`` in source-image pixels. A grid ``(h, w)`` laid over a box has
continuous coordinates ``col = (x − x0)·w/(x1 − x0)``, ``row = (y − y0)·h/(y1 − y0)``: cell ``j``
spans ``[j, j + 1)`` and its centre is ``j + ½``. Every map between two such grids is axis-aligned
affine (:class:`GridMap`). The lookup averages bilinear samples over a sub-grid of each student cell,
as RoIAlign does (He et al., "Mask R-CNN", 2017) with aligned coordinates (Detectron2's
``aligned=True``; ReLabel, Yun et al. 2021, samples half a cell off). Crops aligned to the teacher
grid, which the C-RADIOv4 report samples "to eliminate interpolation effects", take a slicing path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from featcache.errors import UsageError

#: how far a scale may exceed an integer (or a shift miss one) and still count as it
TOL = 1e-6

Box = tuple[float, float, float, float]
Grid = tuple[int, int]


@dataclass(frozen=True)
class GridMap:
    """``dst_col = sx·src_col + tx``, ``dst_row = sy·src_row + ty`` (``sx < 0`` mirrors)."""

    sx: float
    tx: float
    sy: float
    ty: float

    def apply(self, cols, rows):
        """The destination ``(cols, rows)`` of source ``(cols, rows)`` (numbers or arrays)."""
        return self.sx * np.asarray(cols) + self.tx, self.sy * np.asarray(rows) + self.ty

    def inverse(self) -> "GridMap":
        """The map back from destination to source coordinates."""
        return GridMap(1 / self.sx, -self.tx / self.sx, 1 / self.sy, -self.ty / self.sy)

    def then(self, other: "GridMap") -> "GridMap":
        """This map followed by ``other``."""
        return GridMap(other.sx * self.sx, other.sx * self.tx + other.tx,
                       other.sy * self.sy, other.sy * self.ty + other.ty)

    def as_array(self) -> np.ndarray:
        """``[sx, tx, sy, ty]`` as float64, the row :func:`lookup_targets` takes."""
        return np.array([self.sx, self.tx, self.sy, self.ty], dtype=np.float64)

    def shifted(self, dr: int, dc: int) -> "GridMap":
        """The same map into a window of the destination grid whose origin is cell ``(dr, dc)``."""
        return GridMap(self.sx, self.tx - dc, self.sy, self.ty - dr)


def _axis(c0: float, c1: float, n: int, b0: float, b1: float, m: int) -> tuple[float, float]:
    """Scale and shift from an ``n``-cell grid over ``[c0, c1)`` to an ``m``-cell grid over ``[b0, b1)``."""
    k = m / (float(b1) - float(b0))
    return (float(c1) - float(c0)) / n * k, (float(c0) - float(b0)) * k


def cell_map(crop_box: Box, out_grid: Grid, view_box: Box, view_grid: Grid, flip: bool = False) -> GridMap:
    """F_{S→T}: student grid coordinates of a crop (mirrored with ``flip``) → the view's grid coordinates."""
    sx, tx = _axis(crop_box[0], crop_box[2], out_grid[1], view_box[0], view_box[2], view_grid[1])
    sy, ty = _axis(crop_box[1], crop_box[3], out_grid[0], view_box[1], view_box[3], view_grid[0])
    if flip:
        return GridMap(-sx, tx + sx * out_grid[1], sy, ty)
    return GridMap(sx, tx, sy, ty)


def crop_to_crop_map(src_box: Box, src_grid: Grid, src_flip: bool,
                     dst_box: Box, dst_grid: Grid, dst_flip: bool) -> GridMap:
    """Student grid coordinates of one crop → those of another crop of the same image (MESA)."""
    m = cell_map(src_box, src_grid, dst_box, dst_grid, src_flip)
    return m.then(GridMap(-1.0, float(dst_grid[1]), 1.0, 0.0)) if dst_flip else m


def _count(scale: float) -> int:
    return max(1, math.ceil(abs(scale) - TOL))


def subsamples(m: GridMap) -> tuple[int, int]:
    """Sub-samples per student cell (rows, cols): student cell size over teacher cell size, rounded up."""
    return _count(m.sy), _count(m.sx)


def _span(a: float, b: float, lo: float, hi: float, n: int, margin: int) -> tuple[int, int]:
    k = n / (float(hi) - float(lo))
    i0 = math.floor((float(a) - float(lo)) * k) - margin
    i1 = math.ceil((float(b) - float(lo)) * k) + margin
    i0 = min(max(i0, 0), n - 1)
    return i0, max(min(i1, n), i0 + 1)


def window_for(crop_box: Box, view_box: Box, view_grid: Grid, margin: int = 1) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)``: the view's cells that meet the crop plus ``margin`` each side, clipped to
    the grid, never empty. With ``margin >= 1`` it holds every cell the lookup's bilinear taps read."""
    r0, r1 = _span(crop_box[1], crop_box[3], view_box[1], view_box[3], view_grid[0], margin)
    c0, c1 = _span(crop_box[0], crop_box[2], view_box[0], view_box[2], view_grid[1], margin)
    return r0, r1, c0, c1


def _inside(c0: float, c1: float, n: int, lo: float, hi: float) -> np.ndarray:
    centres = float(c0) + (np.arange(n) + 0.5) * ((float(c1) - float(c0)) / n)
    return (centres >= float(lo)) & (centres < float(hi))


def omega(crop_box: Box, out_grid: Grid, view_box: Box, flip: bool = False) -> np.ndarray:
    """Ω ``(hs, ws)``: the student cells whose footprint centre lies in ``[x0, x1) × [y0, y1)`` of the view."""
    rows = _inside(crop_box[1], crop_box[3], out_grid[0], view_box[1], view_box[3])
    cols = _inside(crop_box[0], crop_box[2], out_grid[1], view_box[0], view_box[2])
    return rows[:, None] & (cols[::-1] if flip else cols)[None, :]


def _near_int(t: float) -> bool:
    return abs(t - round(t)) <= TOL * max(1.0, abs(t))


def _is_shift(m: GridMap) -> bool:
    """True when ``m`` moves whole cells (a mirror allowed): the lookup is then integer slicing."""
    return (abs(abs(m.sx) - 1) <= TOL and abs(abs(m.sy) - 1) <= TOL
            and _near_int(m.tx) and _near_int(m.ty))


def _cells(scale: float, shift: float, n: int, size: int) -> np.ndarray:
    """Source cells of ``n`` student cells under a whole-cell shift, clamped to the field."""
    j = np.arange(n)
    cells = j + round(shift) if scale > 0 else round(shift) - 1 - j
    return np.clip(cells, 0, size - 1)


def _positions(scale: float, shift: float, n: int, s: int, size: int) -> np.ndarray:
    """``(n, s)`` field positions of the sub-cell centres of ``n`` student cells, clamped to the field."""
    u = np.arange(n)[:, None] + (np.arange(s) + 0.5) / s
    return np.clip(scale * u + shift, 0.5, size - 0.5)


def _taps(p: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of positions ``p``: cells ``i0``, ``i1`` and the weight ``f`` of ``i1``."""
    q = p - 0.5
    i0 = np.floor(q)
    return i0.astype(np.int64), np.minimum(i0.astype(np.int64) + 1, size - 1), q - i0


def _bilinear(field: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples ``(len(rows), len(cols), C)`` of ``field`` at continuous positions."""
    r0, r1, fr = _taps(rows, field.shape[0])
    c0, c1, fc = _taps(cols, field.shape[1])
    x = (1 - fr)[:, None, None] * field[r0] + fr[:, None, None] * field[r1]
    return (1 - fc)[None, :, None] * x[:, c0] + fc[None, :, None] * x[:, c1]


def resample(field: np.ndarray, m: GridMap, out_grid: Grid) -> np.ndarray:
    """Targets ``(hs, ws, C)`` float32 for the student grid ``out_grid`` from a ``(H, W, C)`` field,
    ``m`` mapping student grid coordinates into the field's: each cell averages bilinear samples at
    the centres of an ``s_rows × s_cols`` sub-grid (see :func:`subsamples`); positions are clamped
    to the field (edge cells repeat). A whole-cell shift returns the stored values themselves."""
    field = np.asarray(field)
    (hs, ws), (h, w) = out_grid, field.shape[:2]
    if _is_shift(m):
        cells = field[_cells(m.sy, m.ty, hs, h)][:, _cells(m.sx, m.tx, ws, w)]
        return cells.astype(np.float32)
    sr, sc = subsamples(m)
    rows, cols = _positions(m.sy, m.ty, hs, sr, h), _positions(m.sx, m.tx, ws, sc, w)
    field = field.astype(np.float32, copy=False)
    out = np.zeros((hs, ws, field.shape[2]), dtype=np.float64)
    for a in range(sr):
        for b in range(sc):
            out += _bilinear(field, rows[:, a], cols[:, b])
    return (out / (sr * sc)).astype(np.float32)


def _view_box(reader, index: int) -> np.ndarray:
    if not reader.row("valid", index):
        raise UsageError(f"{reader.view.key}: image row {index} holds no features (failed or not written yet)")
    return reader.row("box", index).astype(np.float64)


def crop_targets(reader, index: int, crop_box: Box, out_grid: Grid, flip: bool = False,
                 space: str = "raw") -> tuple[np.ndarray, np.ndarray]:
    """The reference lookup: targets ``(hs, ws, C)`` float32 and Ω ``(hs, ws)`` of a student crop of
    image row ``index``, reading only the window of the view that the crop needs."""
    box, grid = _view_box(reader, index), reader.spec.grid
    r0, r1, c0, c1 = window_for(crop_box, box, grid)
    field = reader.read_dense(index, (r0, r1, c0, c1), space)
    m = cell_map(crop_box, out_grid, box, grid, flip).shifted(r0, c0)
    return resample(field, m, out_grid), omega(crop_box, out_grid, box, flip)


def _snap_shifts(maps: torch.Tensor) -> torch.Tensor:
    """Whole-cell shifts (as :func:`_is_shift` sees them) made exact, so they slice."""
    sx, tx, sy, ty = maps.unbind(1)

    def near_int(t):
        return (t - t.round()).abs() <= TOL * t.abs().clamp(min=1.0)

    shift = ((sx.abs() - 1).abs() <= TOL) & ((sy.abs() - 1).abs() <= TOL) & near_int(tx) & near_int(ty)
    exact = torch.stack([sx.sign(), tx.round(), sy.sign(), ty.round()], dim=1)
    return torch.where(shift[:, None], exact, maps)


def _axis_taps(scale: torch.Tensor, shift: torch.Tensor, n: int, extent: torch.Tensor):
    """Cells ``(B, n, T)`` and weights ``(B, n, T)`` that average the sub-samples of ``n`` cells per
    sample; T = 2 × the batch's largest sub-sample count, unused sub-samples weigh zero."""
    counts = torch.ceil(scale.abs() - TOL).clamp(min=1)
    k = torch.arange(int(counts.max()), device=scale.device, dtype=scale.dtype)
    u = torch.arange(n, device=scale.device, dtype=scale.dtype)[None, :, None] + (k + 0.5) / counts[:, None, None]
    top = extent.to(scale.dtype)[:, None, None] - 0.5
    q = torch.minimum((scale[:, None, None] * u + shift[:, None, None]).clamp(min=0.5), top) - 0.5
    i0 = q.floor()
    f, i0 = q - i0, i0.long()
    i1 = torch.minimum(i0 + 1, extent[:, None, None] - 1)
    use = (k < counts[:, None, None]) / counts[:, None, None]
    cells = torch.cat([i0, i1], dim=2)
    weights = torch.cat([(1 - f) * use, f * use], dim=2)
    return cells, weights.float()


def _check_batch(windows: torch.Tensor, maps: torch.Tensor, extents: torch.Tensor) -> None:
    b = len(windows)
    if windows.ndim != 4 or tuple(maps.shape) != (b, 4) or tuple(extents.shape) != (b, 2):
        raise UsageError(f"lookup_targets takes windows (B, C, H, W), maps (B, 4), extents (B, 2); got "
                         f"{tuple(windows.shape)}, {tuple(maps.shape)}, {tuple(extents.shape)}")
    h, w = windows.shape[-2:]
    if b and (extents.min() < 1 or extents[:, 0].max() > h or extents[:, 1].max() > w):
        raise UsageError(f"extents {extents.tolist()} do not fit windows padded to {h}x{w}")


def lookup_targets(windows: torch.Tensor, maps: torch.Tensor, extents: torch.Tensor, out_grid: Grid) -> torch.Tensor:
    """Batched :func:`resample` on the training device: ``(B, C, hs, ws)`` float32 targets from
    zero-padded windows ``(B, C, H, W)`` whose real sizes are ``extents`` ``(B, 2)`` (rows, cols),
    with ``maps`` ``(B, 4)`` = ``[sx, tx, sy, ty]`` from student grid to window grid coordinates.

    Separable: rows first, then columns, each a weighted sum of gathered cells (float32, no
    matmul, so TF32 settings cannot touch it); whole-cell shifts give the stored values exactly."""
    _check_batch(windows, maps, extents)
    x, (hs, ws) = windows.float(), out_grid
    b, c, h, w = x.shape
    if b == 0:
        return x.new_zeros((0, c, hs, ws))
    m = _snap_shifts(maps.to(device=x.device, dtype=torch.float64))
    extents = extents.to(device=x.device, dtype=torch.long)
    rows, wr = _axis_taps(m[:, 2], m[:, 3], hs, extents[:, 0])
    cols, wc = _axis_taps(m[:, 0], m[:, 1], ws, extents[:, 1])
    y = x.new_zeros((b, c, hs, w))
    for t in range(rows.shape[2]):
        y += x.gather(2, rows[:, None, :, t, None].expand(b, c, hs, w)) * wr[:, None, :, t, None]
    out = x.new_zeros((b, c, hs, ws))
    for t in range(cols.shape[2]):
        out += y.gather(3, cols[:, None, None, :, t].expand(b, c, hs, ws)) * wc[:, None, None, :, t]
    return out


@dataclass
class CropConfig:
    """Student crop sampling. ``scale``: area fraction of the image; ``ratio``: aspect distortion
    relative to the student input's own aspect; ``aligned_prob``: chance that a crop sits on the
    teacher grid; ``flip_prob``: chance that the input is mirrored (its targets are the cached map
    mirrored); ``jitter``: extra shift of aligned crops, up to that many whole teacher cells.

    The defaults are the parity benchmark's recipe (BENCHMARKS.md, issue 25): every crop on the teacher
    grid, so a student resolution up to the view's own gives student cells equal to teacher cells, shifted
    in whole cells (exact targets, no interpolation); no mirroring, because a mirrored cached map is the
    teacher's answer to the mirrored image only for a mirror-equivariant teacher. Unaligned crops (scale
    0.25-1, interpolated targets) and mirroring each cost the cache-trained student about a third of its
    probe accuracy there."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    aligned_prob: float = 1.0
    flip_prob: float = 0.0
    jitter: int = 0

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise UsageError(f"crop scale {self.scale} must satisfy 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise UsageError(f"crop ratio {self.ratio} must satisfy 0 < low <= high")
        for name in ("aligned_prob", "flip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        if int(self.jitter) != self.jitter or self.jitter < 0:
            raise UsageError(f"jitter {self.jitter} must be a whole number of teacher cells >= 0")


@dataclass(frozen=True)
class Crop:
    """A student crop: its box in source pixels, whether the input is mirrored, whether it sits on the teacher grid."""

    box: Box
    flip: bool
    aligned: bool


def _random_box(rng: np.random.Generator, image_size: tuple[int, int], aspect: float, cfg: CropConfig) -> Box:
    """A random-resized-crop box (torchvision's recipe) with whole-pixel edges."""
    width, height = image_size
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for _ in range(10):
        area = width * height * rng.uniform(*cfg.scale)
        r = aspect * math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return (float(x), float(y), float(x + w), float(y + h))
    r = min(max(width / height, aspect * cfg.ratio[0]), aspect * cfg.ratio[1])
    w, h = min(width, round(height * r)), min(height, round(width / r))
    x, y = (width - w) // 2, (height - h) // 2
    return (float(x), float(y), float(x + w), float(y + h))


@dataclass(frozen=True)
class _Lattice:
    """The teacher's cell boundaries along one axis, ``lo + k·(hi − lo)/n``, for ``k`` in ``[kmin, kmax]``
    (those inside the image ``[0, size]``)."""

    lo: float
    hi: float
    n: int
    size: int

    @property
    def kmin(self) -> int:
        return math.ceil(-self.lo * self.n / (self.hi - self.lo) - 1e-9)

    @property
    def kmax(self) -> int:
        return math.floor((self.size - self.lo) * self.n / (self.hi - self.lo) + 1e-9)

    def snap(self, a: float, b: float) -> tuple[int, int]:
        """The nearest boundaries to ``[a, b)``, at least one cell apart, inside the image."""
        k = self.n / (self.hi - self.lo)
        k0 = min(max(round((a - self.lo) * k), self.kmin), self.kmax - 1)
        return k0, min(max(round((b - self.lo) * k), k0 + 1), self.kmax)

    def shift(self, k0: int, k1: int, d: int) -> tuple[int, int]:
        """``[k0, k1)`` moved by ``d`` cells, kept inside the image."""
        d = min(max(d, self.kmin - k0), self.kmax - k1)
        return k0 + d, k1 + d

    def edge(self, k: int) -> float:
        return min(max(self.lo + (self.hi - self.lo) * k / self.n, 0.0), float(self.size))


def _aligned_box(rng, image_size, view_box, view_grid, out_grid, cfg: CropConfig) -> Box:
    """A box on the view's cell boundaries: exactly ``out_grid`` teacher cells when the grid holds
    that many (student cells = teacher cells), else a random box snapped to the boundaries."""
    lx = _Lattice(float(view_box[0]), float(view_box[2]), view_grid[1], image_size[0])
    ly = _Lattice(float(view_box[1]), float(view_box[3]), view_grid[0], image_size[1])
    (hs, ws), (h, w) = out_grid, view_grid
    if hs <= h and ws <= w:
        c0, r0 = int(rng.integers(0, w - ws + 1)), int(rng.integers(0, h - hs + 1))
        cols, rows = (c0, c0 + ws), (r0, r0 + hs)
    else:
        x0, y0, x1, y1 = _random_box(rng, image_size, ws / hs, cfg)
        cols, rows = lx.snap(x0, x1), ly.snap(y0, y1)
    if cfg.jitter:
        dc, dr = (int(d) for d in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
        cols, rows = lx.shift(*cols, dc), ly.shift(*rows, dr)
    return (lx.edge(cols[0]), ly.edge(rows[0]), lx.edge(cols[1]), ly.edge(rows[1]))


def sample_crop(rng: np.random.Generator, image_size: tuple[int, int], view_box: Box, view_grid: Grid,
                out_grid: Grid, cfg: CropConfig | None = None) -> Crop:
    """A random student crop of a ``(W, H)`` image for a student grid ``out_grid``; deterministic in ``rng``.

    With probability ``cfg.aligned_prob`` the crop sits on the teacher grid of the view
    (``view_box``, ``view_grid``), so its lookup is plain slicing when the cell sizes match."""
    cfg = cfg or CropConfig()
    aligned, flip = bool(rng.random() < cfg.aligned_prob), bool(rng.random() < cfg.flip_prob)
    if aligned:
        box = _aligned_box(rng, image_size, view_box, view_grid, out_grid, cfg)
    else:
        box = _random_box(rng, image_size, out_grid[1] / out_grid[0], cfg)
    return Crop(box=box, flip=flip, aligned=aligned)
