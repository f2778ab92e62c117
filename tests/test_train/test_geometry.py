"""Ground-truth tests of featcache.geometry (DESIGN.md §3).

Views of a real cache store, at every cell, that cell's centre in source pixels: the lookup must
then give every student cell its own footprint centre. A patch-local teacher gives the exact
check of aligned crops; the torch lookup is checked against the numpy reference.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.geometry import (Crop, CropConfig, GridMap, cell_map, crop_targets, crop_to_crop_map, lookup_targets,
                                omega, resample, sample_crop, subsamples, window_for)
from featcache.store import Cache
from featcache.teachers.views import view_box
from tests.support.caches import spec, write_manifest
from tests.support.images import photo

N, SHARD, HEIGHT = 6, 3, 480  # manifest rows are 640 + i wide and 480 high
VIEWS = {  # key -> (grid, tile, mosaic)
    "affine@96x144": ((6, 9), (3, 3), 1),
    "affine-mosaic2@64": ((4, 4), None, 2),
}
ODD_BOX = (13.5, 7.25, 500.75, 431.0)  # exact in float32, like every stored box


def _width(i: int) -> int:
    return 640 + i


def _box(i: int) -> tuple[float, float, float, float]:
    """Row i's view box: the whole image, its centred square, or a box inside it."""
    kind = i % 3
    if kind == 0:
        return (0.0, 0.0, float(_width(i)), float(HEIGHT))
    return tuple(float(v) for v in view_box(_width(i), HEIGHT, "center")) if kind == 1 else ODD_BOX


def _cell_centres(box, grid) -> np.ndarray:
    """(h, w, 2): each teacher cell's centre (x, y) in source pixels."""
    (h, w), (x0, y0, x1, y1) = grid, box
    x = x0 + (np.arange(w) + 0.5) * (x1 - x0) / w
    y = y0 + (np.arange(h) + 0.5) * (y1 - y0) / h
    return np.stack(np.broadcast_arrays(x[None, :], y[:, None]), axis=-1)


def _footprints(c0: float, c1: float, n: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Footprint [lo, hi) of each of n student cells along one axis (mirrored with flip)."""
    j = np.arange(n)[::-1] if flip else np.arange(n)
    size = (c1 - c0) / n
    return c0 + j * size, c0 + (j + 1) * size


def _footprint_centres(box, grid, flip: bool) -> np.ndarray:
    """(hs, ws, 2): each student cell's footprint centre (x, y)."""
    xl, xh = _footprints(box[0], box[2], grid[1], flip)
    yl, yh = _footprints(box[1], box[3], grid[0])
    return np.stack(np.broadcast_arrays(((xl + xh) / 2)[None, :], ((yl + yh) / 2)[:, None]), axis=-1)


def _in_hull(c0, c1, n, flip, lo, hi, cells) -> np.ndarray:
    """Student cells whose footprint lies between the first and last of ``cells`` centres over [lo, hi)."""
    fl, fh = _footprints(c0, c1, n, flip)
    half = (hi - lo) / cells / 2
    return (fl >= lo + half - 1e-9) & (fh <= hi - half + 1e-9)


def _random_crop(rng, width: float, height: float) -> tuple[float, float, float, float]:
    area = width * height * rng.uniform(0.03, 1.0)
    r = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
    w, h = min(width, math.sqrt(area * r)), min(height, math.sqrt(area / r))
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (x, y, x + w, y + h)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache whose affine views store cell centres (f32) and whose noise view stores random f16 values."""
    root = str(tmp_path_factory.mktemp("geometry") / "cache")
    write_manifest(root, N)
    cache = Cache.open(root)
    boxes = np.array([_box(i) for i in range(N)], dtype=np.float32)
    for key, (grid, tile, mosaic) in VIEWS.items():
        s = dataclasses.replace(spec(key, grid=grid, channels=2, tile=tile, dtype="float32"), mosaic=mosaic)
        dense = np.stack([_cell_centres(b.astype(np.float64), grid) for b in boxes]).astype(np.float32)
        _write(cache.create_view(s, shard_size=SHARD), dense, boxes)
    noise = np.random.default_rng(0).standard_normal((N, 6, 9, 4)).astype(np.float16)
    _write(cache.create_view(spec("noise@96x144", grid=(6, 9), channels=4, tile=(2, 3)), shard_size=SHARD),
           noise, boxes)
    return cache


def _write(view, dense: np.ndarray, boxes: np.ndarray) -> None:
    for start in range(0, N, SHARD):
        rows = slice(start, start + SHARD)
        view.write_shard(start, dense[rows], np.zeros((SHARD, 5), np.float16), boxes[rows])


@pytest.mark.parametrize("key", list(VIEWS))
def test_affine_field_gives_footprint_centres(cache, key):
    """Every student cell gets its footprint centre wherever the footprint is inside the hull of the
    teacher cell centres, for random crops, scales, aspect ratios, flips and student grids; Ω is
    exactly the set of cells whose centre lies in the view box."""
    reader, grid, rng = cache.view(key).reader(), VIEWS[key][0], np.random.default_rng(1)
    checked = total = 0
    for k in range(30):
        i = k % N
        crop, flip = _random_crop(rng, _width(i), HEIGHT), bool(rng.random() < 0.5)
        out = tuple(int(v) for v in rng.integers(1, 25, size=2))
        targets, om = crop_targets(reader, i, crop, out, flip)
        (x0, y0, x1, y1), want = _box(i), _footprint_centres(crop, out, flip)
        cols = _in_hull(crop[0], crop[2], out[1], flip, x0, x1, grid[1])
        rows = _in_hull(crop[1], crop[3], out[0], False, y0, y1, grid[0])
        tol = 1e-5 * max(_width(i), HEIGHT)
        np.testing.assert_allclose(targets[:, cols, 0], want[:, cols, 0], rtol=0, atol=tol)
        np.testing.assert_allclose(targets[rows, :, 1], want[rows, :, 1], rtol=0, atol=tol)
        centre = want.astype(np.float64)
        inside = (centre[..., 0] >= x0) & (centre[..., 0] < x1) & (centre[..., 1] >= y0) & (centre[..., 1] < y1)
        np.testing.assert_array_equal(om, inside)
        checked, total = checked + cols.sum() * out[0] + rows.sum() * out[1], total + 2 * out[0] * out[1]
    assert checked > 0.3 * total


def _lattice_start(c0: float, lo: float, hi: float, n: int) -> int:
    k = (c0 - lo) * n / (hi - lo)
    assert abs(k - round(k)) < 1e-9
    return round(k)


@pytest.mark.parametrize("out", [(4, 5), (6, 9), (1, 2)])
def test_aligned_crops_slice_stored_values(cache, out):
    """Aligned crops with matching cell sizes look up exactly the stored cells (mirrored with flip)."""
    reader, rng = cache.view("noise@96x144").reader(), np.random.default_rng(3)
    cfg = CropConfig(aligned_prob=1.0)
    for k in range(12):
        i = k % N
        full = reader.read_dense(i).astype(np.float32)
        box = _box(i)
        crop = sample_crop(rng, (_width(i), HEIGHT), box, (6, 9), out, cfg)
        targets, om = crop_targets(reader, i, crop.box, out, crop.flip)
        r0, c0 = _lattice_start(crop.box[1], box[1], box[3], 6), _lattice_start(crop.box[0], box[0], box[2], 9)
        want = full[r0:r0 + out[0], c0:c0 + out[1]]
        np.testing.assert_array_equal(targets, want[:, ::-1] if crop.flip else want)
        assert om.all()


def test_patch_local_teacher_on_aligned_crops_equals_lookup(tmp_path):
    """A teacher whose features depend only on each patch's pixels, run directly on an aligned crop,
    equals the lookup of the cached whole-image features bit for bit (mirrored for flips)."""
    from featcache.teachers import create_teacher
    from featcache.teachers.views import make_views
    from tests.support.teachers import save_patch_local

    folder, _ = save_patch_local(tmp_path / "teacher")
    teacher = create_teacher("dinov3", str(folder))
    pixels = Image.open(photo("astronaut")).convert("RGB").resize((128, 96))
    image = torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1)
    views, boxes = make_views([image], teacher.spec, size=(96, 128))
    dense = teacher.extract(views).dense.numpy()
    write_manifest(str(tmp_path / "cache"), 1)
    view = Cache.open(str(tmp_path / "cache")).create_view(
        spec("dinov3@96x128", grid=(6, 8), channels=dense.shape[-1], dtype="float32"), shard_size=1)
    view.write_shard(0, dense, np.zeros((1, 5), np.float16), boxes.numpy())
    reader, rng = view.reader(), np.random.default_rng(5)
    for out in [(3, 4), (5, 2), (6, 8)]:
        crop = sample_crop(rng, (128, 96), (0, 0, 128, 96), (6, 8), out, CropConfig(aligned_prob=1.0))
        x0, y0, x1, y1 = (int(v) for v in crop.box)
        direct = teacher.extract(make_views([image[:, y0:y1, x0:x1]], teacher.spec, size=(y1 - y0, x1 - x0))[0])
        want = direct.dense[0].numpy()
        targets, _ = crop_targets(reader, 0, crop.box, out, crop.flip)
        np.testing.assert_array_equal(targets, want[:, ::-1] if crop.flip else want)


def _lookup_case(rng, out, aligned: bool):
    """A random field, crop and window: (window, map into it, numpy reference, is a whole-cell shift)."""
    h, w = (int(v) for v in rng.integers(3, 13, size=2))
    image = (float(rng.uniform(100, 300)), float(rng.uniform(100, 300)))
    vb = (float(rng.uniform(0, 20)), float(rng.uniform(0, 20)), image[0] - rng.uniform(0, 20),
          image[1] - rng.uniform(0, 20))
    field = rng.standard_normal((h, w, 3)).astype(np.float32)
    if aligned:
        crop = sample_crop(rng, image, vb, (h, w), out, CropConfig(aligned_prob=1.0))
        box, flip = crop.box, crop.flip
    else:
        box, flip = _random_crop(rng, *image), bool(rng.random() < 0.5)
    r0, r1, c0, c1 = window_for(box, vb, (h, w))
    m = cell_map(box, out, vb, (h, w), flip).shifted(r0, c0)
    return field[r0:r1, c0:c1], m, aligned and h >= out[0] and w >= out[1]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lookup_targets_equals_resample(device, dtype):
    """The batched torch lookup equals the numpy reference per sample, across mixed window sizes
    (zero-padded), scales finer and coarser than the teacher, flips, and whole-cell shifts (exactly)."""
    rng, out = np.random.default_rng(4), (5, 7)
    cases = [_lookup_case(rng, out, aligned=k % 3 == 0) for k in range(24)]
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    wins = [w.astype(np_dtype) for w, _, _ in cases]
    H, W = max(w.shape[0] for w in wins), max(w.shape[1] for w in wins)
    windows = torch.zeros((len(wins), 3, H, W), dtype=dtype)
    for b, win in enumerate(wins):
        windows[b, :, :win.shape[0], :win.shape[1]] = torch.from_numpy(win).permute(2, 0, 1)
    maps = torch.from_numpy(np.stack([m.as_array() for _, m, _ in cases])).float()
    extents = torch.tensor([w.shape[:2] for w in wins])
    got = lookup_targets(windows.to(device), maps.to(device), extents.to(device), out).cpu().numpy()
    assert got.dtype == np.float32 and got.shape == (len(cases), 3, *out)
    assert len({subsamples(m) for _, m, _ in cases}) > 2 and sum(fast for _, _, fast in cases) >= 4
    for b, (win, (_, m, fast)) in enumerate(zip(wins, cases)):
        want = resample(win, m, out).transpose(2, 0, 1)
        if fast:
            np.testing.assert_array_equal(got[b], want)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-5 * np.abs(win).max())


def test_crop_to_crop_map_carries_one_crop_onto_another():
    """Crop A's footprint centres, resampled through the map from B's grid to A's, are B's footprint
    centres wherever B's footprint lies inside the hull of A's cell centres."""
    rng = np.random.default_rng(6)
    checked = 0
    for _ in range(20):
        a, b = _random_crop(rng, 640, 480), _random_crop(rng, 640, 480)
        ga, gb = tuple(int(v) for v in rng.integers(2, 20, size=2)), tuple(int(v) for v in rng.integers(2, 20, size=2))
        fa, fb = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        m = crop_to_crop_map(b, gb, fb, a, ga, fa)
        np.testing.assert_allclose(m.as_array(), crop_to_crop_map(a, ga, fa, b, gb, fb).inverse().as_array(),
                                   rtol=1e-9, atol=1e-9)
        got, want = resample(_footprint_centres(a, ga, fa), m, gb), _footprint_centres(b, gb, fb)
        cols = _in_hull(b[0], b[2], gb[1], fb, a[0], a[2], ga[1])
        rows = _in_hull(b[1], b[3], gb[0], False, a[1], a[3], ga[0])
        np.testing.assert_allclose(got[:, cols, 0], want[:, cols, 0], rtol=0, atol=1e-5 * 640)
        np.testing.assert_allclose(got[rows, :, 1], want[rows, :, 1], rtol=0, atol=1e-5 * 640)
        checked += cols.sum() + rows.sum()
    assert checked > 50


def test_gridmap_algebra():
    """Composition, inverse, shift and the cell map agree with applying the maps one after the other."""
    a, b = GridMap(-0.5, 7.0, 2.0, -3.0), GridMap(3.0, 1.5, -0.25, 4.0)
    cols, rows = np.array([0.0, 1.5, 9.0]), np.array([2.0, -1.0, 4.5])
    np.testing.assert_allclose(a.then(b).apply(cols, rows), b.apply(*a.apply(cols, rows)))
    np.testing.assert_allclose(a.inverse().apply(*a.apply(cols, rows)), (cols, rows))
    dst_cols, dst_rows = a.apply(cols, rows)
    np.testing.assert_allclose(a.shifted(2, 5).apply(cols, rows), (dst_cols - 5, dst_rows - 2))
    assert subsamples(GridMap(1.0000001, 0, 2.5, 0)) == (3, 1) and subsamples(GridMap(-0.2, 0, 0.5, 0)) == (1, 1)
    crop, view = (10.0, 20.0, 110.0, 70.0), (0.0, 0.0, 200.0, 100.0)
    m = cell_map(crop, (5, 4), view, (10, 8), flip=True)
    assert m == crop_to_crop_map(crop, (5, 4), True, view, (10, 8), False)
    np.testing.assert_allclose(m.apply(0.5, 0.5), ((110.0 - 12.5) * 8 / 200, (20.0 + 5.0) * 10 / 100))


def _on_lattice(v: float, lo: float, hi: float, n: int) -> bool:
    k = (v - lo) * n / (hi - lo)
    return abs(k - round(k)) < 1e-9


def test_sample_crop():
    """Crops lie in the image; aligned ones sit on teacher cell boundaries and, when the grid holds
    the student grid, have the teacher's cell size (a whole-cell shift: the slicing path); flips
    and aligned crops come at the configured rates; a seed fixes the crops."""
    image, vb, grid, out = (640, 480), (80.0, 0.0, 560.0, 480.0), (6, 6), (4, 5)
    cfg = CropConfig(aligned_prob=0.3, flip_prob=0.2, jitter=2)
    rng = np.random.default_rng(7)
    crops = [sample_crop(rng, image, vb, grid, out, cfg) for _ in range(1000)]
    assert abs(np.mean([c.flip for c in crops]) - 0.2) < 0.05
    assert abs(np.mean([c.aligned for c in crops]) - 0.3) < 0.05
    outside = 0
    for c in crops:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= image[0] and 0 <= y0 < y1 <= image[1]
        if c.aligned:
            assert all(_on_lattice(v, vb[i % 2], vb[i % 2 + 2], grid[1 - i % 2]) for i, v in enumerate(c.box))
            m = cell_map(c.box, out, vb, grid, c.flip)
            assert subsamples(m) == (1, 1) and np.allclose(np.abs([m.sx, m.sy]), 1, rtol=0, atol=1e-9)
            assert np.allclose([m.tx, m.ty], np.round([m.tx, m.ty]), rtol=0, atol=1e-9)
            outside += x0 < vb[0] or x1 > vb[2]
    assert outside > 0
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    first = [sample_crop(rng_a, image, vb, grid, out, cfg) for _ in range(20)]
    assert first == [sample_crop(rng_b, image, vb, grid, out, cfg) for _ in range(20)]
    assert first != [sample_crop(np.random.default_rng(12), image, vb, grid, out, cfg) for _ in range(20)]


def test_sample_crop_snaps_when_the_grid_is_smaller_than_the_student_grid():
    """With fewer teacher cells than student cells the aligned crop's edges still sit on cell boundaries."""
    rng, vb, grid = np.random.default_rng(8), (0.0, 0.0, 640.0, 480.0), (3, 7)
    for _ in range(100):
        c = sample_crop(rng, (640, 480), vb, grid, (8, 8), CropConfig(aligned_prob=1.0))
        assert c.aligned and isinstance(c, Crop)
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert all(_on_lattice(v, vb[i % 2], vb[i % 2 + 2], grid[1 - i % 2]) for i, v in enumerate(c.box))


def test_crop_config_refuses_bad_values():
    for bad in [dict(scale=(0.0, 1.0)), dict(ratio=(2.0, 1.0)), dict(flip_prob=1.5), dict(jitter=-1)]:
        with pytest.raises(ValueError):
            CropConfig(**bad)


def test_window_covers_every_sample():
    """A window smaller than the grid gives the same targets as the whole grid; it is never empty."""
    rng, grid, vb = np.random.default_rng(9), (12, 16), (0.0, 0.0, 640.0, 480.0)
    field = rng.standard_normal((*grid, 3)).astype(np.float32)
    smaller = 0
    for _ in range(30):
        crop, flip = _random_crop(rng, 640, 480), bool(rng.random() < 0.5)
        out = tuple(int(v) for v in rng.integers(1, 20, size=2))
        r0, r1, c0, c1 = window_for(crop, vb, grid)
        smaller += (r1 - r0) * (c1 - c0) < grid[0] * grid[1]
        m = cell_map(crop, out, vb, grid, flip)
        np.testing.assert_allclose(resample(field[r0:r1, c0:c1], m.shifted(r0, c0), out), resample(field, m, out),
                                   rtol=1e-6, atol=1e-6)
    assert smaller > 20
    for crop in [(600.0, 0.0, 640.0, 50.0), (0.0, 0.0, 30.0, 30.0)]:
        r0, r1, c0, c1 = window_for(crop, (80.0, 0.0, 560.0, 480.0), grid)
        assert 0 <= r0 < r1 <= grid[0] and 0 <= c0 < c1 <= grid[1]
        assert not omega(crop, (3, 3), (80.0, 0.0, 560.0, 480.0)).any()
