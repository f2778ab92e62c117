"""The training data path (DESIGN.md §5): source image + student crop + the teacher windows that crop
needs + the affine maps, read straight from the cache; resampling happens batched on the device.

A batch is a list of :class:`Item` keys made by :class:`BatchPlan` from (seed, step) alone, so a
resumed run sees exactly the batches an uninterrupted one would, whatever the number of loader
workers. :class:`CacheDataset` is picklable and opens its readers lazily in each process (no file
handle or lock crosses a fork). Only the window of ``dense[i]`` a crop covers is read, with one
cell of margin (``featcache.geometry.window_for``); a shard's small arrays are fetched once.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from featcache import geometry
from PIL import Image

from featcache.decode import decode_rgb
from featcache.errors import StorageError, UsageError
from featcache.log import LogStream
from featcache.retry import describe, is_transient
from featcache.store.cache import Cache
from featcache.store.loader import CacheReader

#: Tries of one read before a run stops: the first and extract's default of three retries
MAX_READ_ATTEMPTS = 4

#: The student's input normalization (ImageNet statistics); :func:`normalize` applies it.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Item:
    """One sample of one step: image ``row`` seen at ``resolution`` from ``partition``'s views;
    ``seed`` decides its crops (empty: the first teacher's whole view, for evaluation)."""

    row: int
    resolution: int
    partition: str
    seed: tuple[int, ...]


class BatchPlan:
    """The batches of a run, a pure function of (seed, step): rows in a fresh permutation per epoch,
    one resolution per batch drawn from the low or the high partition (ALGORITHMS.md §6). ``share`` = (first,
    stop): a data-parallel rank's part of every batch (``featcache.train.distributed``); its items keep their
    place in the global batch, and so their crops."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, low: list[int], high: list[int],
                 high_prob: float, share: tuple[int, int] | None = None):
        if len(rows) == 0:
            raise UsageError("no training rows: every image is failed, unwritten or held out")
        self.rows, self.batch_size, self.seed = np.asarray(rows), batch_size, seed
        self.share = share or (0, batch_size)
        self.low, self.high, self.high_prob = list(low), list(high), high_prob
        self._perm: tuple[int, np.ndarray] | None = None

    def resolution(self, step: int) -> tuple[int, str]:
        rng = np.random.default_rng([self.seed, step, 1])
        partition = "high" if self.high and rng.random() < self.high_prob else "low"
        sizes = self.high if partition == "high" else self.low
        return int(sizes[rng.integers(len(sizes))]), partition

    def batch(self, step: int) -> list[Item]:
        res, partition = self.resolution(step)
        items = []
        for k in range(*self.share):
            p = step * self.batch_size + k
            epoch, at = divmod(p, len(self.rows))
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch, 0]).permutation(self.rows))
            items.append(Item(int(self._perm[1][at]), res, partition, (self.seed, step, k)))
        return items


#: groups of shards a shard-sequential reader fetches ahead of the one it reads (it holds 1 + AHEAD groups)
AHEAD = 2


class ShardPlan(BatchPlan):
    """The batches of a run that reads whole shard objects (``data.read = "shards"``, DESIGN.md §5), as
    webdataset's and mosaicml streaming's users know them: each epoch a permutation of the shards (seed,
    epoch), dealt to the ranks in turn; a rank goes through its shards ``buffer`` at a time, the rows of a
    group shuffled together (seed, epoch, rank, group), as a shuffle buffer of that many shards would, but as a
    pure function of (seed, epoch, rank): a resumed run continues the same order. A rank's epochs follow each
    other without a gap (ranks may hold different numbers of rows), and its part of step s is positions
    [s·n, (s + 1)·n) of its sequence, n = batch_size / world; items keep their place in the global batch."""

    def __init__(self, rows: np.ndarray, shard_size: int, batch_size: int, seed: int, low: list[int],
                 high: list[int], high_prob: float, rank: int = 0, world: int = 1, buffer: int = 4):
        n = batch_size // world
        super().__init__(rows, batch_size, seed, low, high, high_prob, (rank * n, (rank + 1) * n))
        self.rank, self.world, self.buffer, self.n = rank, world, buffer, n
        shard_of = self.rows // shard_size
        self.shards = np.unique(shard_of)
        if len(self.shards) < world:
            raise UsageError(f"the training rows lie in {len(self.shards)} shard(s), fewer than the {world} processes "
                             "that read shard by shard: use data.read = \"windows\" or fewer processes")
        self._rows = {int(k): self.rows[shard_of == k] for k in self.shards}
        self._lengths: list[int] = []  # rows of this rank's epochs 0, 1, ...
        #: the epoch last drawn: its groups and where each starts in the epoch
        self._order: tuple[int, list[np.ndarray], np.ndarray] | None = None

    def shards_of(self, epoch: int) -> list[int]:
        """This rank's shards in ``epoch``, in the order it reads them."""
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(self.shards)
        return [int(k) for k in order[self.rank::self.world]]

    def groups(self, epoch: int) -> list[np.ndarray]:
        """This rank's rows in ``epoch``: a group per ``buffer`` shards, its rows shuffled together."""
        return self._drawn(epoch)[1]

    def _drawn(self, epoch: int) -> tuple[int, list[np.ndarray], np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            mine = self.shards_of(epoch)
            groups = []
            for g in range(0, len(mine), self.buffer):
                rows = np.concatenate([self._rows[k] for k in mine[g:g + self.buffer]])
                groups.append(np.random.default_rng([self.seed, epoch, self.rank, g, 3]).permutation(rows))
            self._order = (epoch, groups, np.cumsum([0] + [len(g) for g in groups]))
        return self._order

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, group, index in the group) of this rank's ``position``-th sample."""
        epoch = 0
        while True:
            if epoch == len(self._lengths):
                self._lengths.append(sum(len(self._rows[k]) for k in self.shards_of(epoch)))
            if position < self._lengths[epoch]:
                break
            position -= self._lengths[epoch]
            epoch += 1
        starts = self._drawn(epoch)[2]
        g = int(np.searchsorted(starts, position, side="right")) - 1
        return epoch, g, position - int(starts[g])

    def batch(self, step: int) -> list[Item]:
        res, partition = self.resolution(step)
        items = []
        for j in range(self.n):
            epoch, g, at = self.locate(step * self.n + j)
            items.append(Item(int(self.groups(epoch)[g][at]), res, partition, (self.seed, step, self.share[0] + j)))
        return items

    def ahead(self, step: int, groups: int = AHEAD) -> list[int]:
        """A row of each shard of the ``groups`` groups after the one step ``step`` starts in (into the next
        epoch after an epoch's last), nearest first: what a reader fetches while this group is read."""
        epoch, g, _ = self.locate(step * self.n)
        rows = []
        for _ in range(groups):  # counted from the epoch's shards: no other epoch's rows are drawn
            shards = self.shards_of(epoch)
            epoch, g = (epoch, g + 1) if (g + 1) * self.buffer < len(shards) else (epoch + 1, 0)
            rows += [int(self._rows[k][0]) for k in self.shards_of(epoch)[g * self.buffer:(g + 1) * self.buffer]]
        return rows


class StepSampler(torch.utils.data.Sampler):
    """Batches of steps ``[start, stop)`` for a DataLoader's ``batch_sampler``."""

    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.plan.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def crop_pixels(image: Image.Image, box, size: tuple[int, int], flip: bool = False, scale: int = 1) -> torch.Tensor:
    """The student's input as uint8 ``(3, h, w)`` (:func:`normalize` makes it the student's float
    input on the training device): source box ``box`` (fractional pixels allowed) of ``image``, an
    RGB Pillow image decoded at 1/``scale`` of the manifest's size, resized to ``size``, mirrored
    when ``flip``.

    Output pixel (i, j) samples the source at the centre of its footprint in the box (Pillow's
    resampling convention), so the student grid's cells have exactly the footprints
    ``featcache.geometry`` assumes; shrinking widens the filter by the shrink factor (antialiasing),
    in one pass over the box alone. A box that leaves the image (by rounding) is clipped to it."""
    out = image.resize((size[1], size[0]), Image.BILINEAR, box=_source_box(image, box, scale))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1)))


def float_channels(image: Image.Image) -> list[Image.Image]:
    """An RGB image as three float ("F" mode) images in [0, 1], for :func:`crop_float`."""
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    return [Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F") for c in range(3)]


def crop_float(channels: list[Image.Image], box, size: tuple[int, int], scale: int = 1,
               resample: str = "bilinear") -> torch.Tensor:
    """A teacher's input for online targets, float32 ``(3, h, w)`` in [0, 1]: the box and pixel
    convention of :func:`crop_pixels`, unflipped, with the teacher's filter (its spec's ``resize``),
    computed in float on :func:`float_channels`: no uint8 rounding (which tiny teachers amplify to 2%
    of their features), so on a view's own box it is extraction's antialiased torch resize
    (``featcache.teachers.views.crop_resize``) to 1e-6."""
    if resample not in _RESAMPLE:
        raise UsageError(f"unknown resize {resample!r}; known: {', '.join(_RESAMPLE)}")
    source = _source_box(channels[0], box, scale)
    return torch.from_numpy(np.stack([np.asarray(c.resize((size[1], size[0]), _RESAMPLE[resample], box=source))
                                      for c in channels]))


def _source_box(image: Image.Image, box, scale: int) -> tuple[float, float, float, float]:
    """``box`` (manifest pixels) in the pixels of ``image`` decoded at 1/``scale``, clipped to it."""
    W, H = image.size
    x0, y0, x1, y1 = (min(max(float(v) / scale, 0.0), limit) for v, limit in zip(box, (W, H, W, H)))
    if x1 <= x0 or y1 <= y0:
        raise UsageError(f"crop {box} lies outside the {W * scale}x{H * scale} image")
    return x0, y0, x1, y1


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 3, h, w)`` student inputs as the normalized float32 the student takes."""
    mean = torch.tensor(MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float().div_(255.0) - mean) / std


def reduction(boxes, size: tuple[int, int]) -> int:
    """How much smaller a JPEG may decode (1, 2, 4 or 8) and still give every box at least ``size``
    pixels of its own: the DCT's reduction then replaces most of the resize's antialiasing."""
    shrink = min(min((b[2] - b[0]) / size[1], (b[3] - b[1]) / size[0]) for b in boxes)
    return 1 << min(3, max(0, math.floor(math.log2(shrink)))) if shrink >= 1 else 1


class CacheDataset(torch.utils.data.Dataset):
    """Samples for the student loop, keyed by :class:`Item`.

    ``teachers`` maps a teacher name to ``{partition: view key}``; ``crop`` is a
    :class:`featcache.geometry.CropConfig`; with ``mesa`` each sample carries a second crop of the
    same image for the EMA student and the map between the two grids. Picklable, as its
    :class:`CacheReader` is. ``whole_shards`` > 0: the shards a training batch (and the plan's next group,
    :meth:`ShardPlan.ahead`) needs are fetched whole and that many held per view; evaluation rows stay ranged reads.

    With :attr:`teacher_inputs` set (online targets, :mod:`featcache.train.online`) no window is read:
    each teacher's part carries instead ``pixels``, the crop's source box (unflipped) at its view's
    input size (:func:`crop_float`), and the map from the student grid onto that whole input's grid.
    """

    def __init__(self, root: str, teachers: dict[str, dict[str, str]], patch: int, crop: geometry.CropConfig,
                 space: str = "phis", mesa: bool = False, max_pixels: int = 2 * 89_478_485, whole_shards: int = 0):
        self.teachers, self.patch, self.crop, self.mesa, self.max_pixels = teachers, patch, crop, mesa, max_pixels
        keys = sorted({k for views in teachers.values() for k in views.values()})
        self.views = CacheReader(root, keys, space, whole_shards)
        self.lookahead: BatchPlan | None = None  # the run's batches: a batch also asks for the next one's windows
        #: online targets: view key -> (teacher input size (h, w), resize); None reads the cached windows
        self.teacher_inputs: dict[str, tuple[tuple[int, int], str]] | None = None
        self._pool: tuple[int, ThreadPoolExecutor] | None = None

    def __len__(self) -> int:
        return len(self.views)

    def reader(self, key: str):
        return self.views.view(key)

    def image(self, row: int, reduce: int = 1, data: bytes | None = None) -> tuple[Image.Image, int]:
        """Image ``row`` (its file's bytes, unless given) decoded, at 1/s of its size for a JPEG when
        ``reduce`` allows, and its ``s``."""
        uri = self.views.uris[row]
        return decode_rgb(self.views.image_bytes(row) if data is None else data, uri, self.max_pixels, reduce)

    def __getitem__(self, item: Item) -> dict:
        return retrying(lambda: self._sample(item, self._plan(item)), f"reading image row {item.row}")

    def __getitems__(self, items: list[Item]) -> dict:
        """A batch, read again after a transient storage error (:func:`retrying`)."""
        rows = ", ".join(str(item.row) for item in items)
        return retrying(lambda: self._batch(items), f"reading the batch of image rows {rows}")

    def _batch(self, items: list[Item]) -> dict:
        """A batch (the DataLoader's fetch), assembled here: the images' files are read first (small
        reads that would otherwise queue behind the windows), every sample's windows are asked of the
        kernel (and, with :attr:`lookahead`, the next step's), then a thread reads them straight into
        the batch's padded buffers, sample by sample as the disk delivers them, while this one
        decodes and resizes the images."""
        if isinstance(self.lookahead, ShardPlan) and items and items[0].seed:  # whole shards: this batch's, then
            for row in [item.row for item in items] + self.lookahead.ahead(items[0].seed[1]):  # the next groups'
                for key in self.views.keys:
                    self.reader(key).prefetch(row, None)
        plans = [self._plan(item) for item in items]
        files = [self.views.image_bytes(item.row) for item in items]
        if self.teacher_inputs is not None:  # online targets: no window to read
            return collate([self._sample(item, plan, data) for item, plan, data in zip(items, plans, files)])
        self._prefetch(items, plans)
        if self.lookahead is not None and items and items[0].seed:  # the next step's, queued behind these
            following = self.lookahead.batch(items[0].seed[1] + 1)
            self._prefetch(following, [self._plan(item) for item in following])
        samples = [self._features(item, plan, dense=False) for item, plan in zip(items, plans)]
        windows = {name: _window_batch([s[name] for s in samples]) for name in self.teachers}
        reading = self._reader_thread().submit(self._read_windows, items, plans, windows)
        try:
            for sample, item, plan, data in zip(samples, items, plans, files):
                sample.update(self._pixels(item, plan, data))
        finally:
            wait([reading])  # the thread is done with the buffers, whatever happened here
        reading.result()
        return collate(samples, windows)

    def _read_windows(self, items: list[Item], plans: list[tuple], batch: dict[str, torch.Tensor]) -> None:
        for k, (item, (_, _, windows)) in enumerate(zip(items, plans)):  # in the order the disk reads them
            for name, views in self.teachers.items():
                key = views[item.partition]
                r0, r1, c0, c1 = windows[key]
                out = batch[name][k, :r1 - r0, :c1 - c0]
                if self.views.device_space(key) == "stored":
                    self.reader(key).read_dense_into(item.row, windows[key], out.numpy())
                else:
                    out.copy_(torch.from_numpy(self.reader(key).read_dense(item.row, windows[key], self.views.space)))

    def _reader_thread(self) -> ThreadPoolExecutor:
        """This process's window-reading thread (a DataLoader worker makes its own)."""
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="featcache-windows"))
        return self._pool[1]

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def _prefetch(self, items: list[Item], plans: list[tuple]) -> None:
        for item, (_, _, windows) in zip(items, plans):
            for key, window in windows.items():
                self.reader(key).prefetch(item.row, window)

    def _plan(self, item: Item) -> tuple:
        """(crop, MESA's second crop or None, the window of each view): from the manifest's image size
        and the views' boxes, before any pixel or feature is read."""
        W, H = (int(v) for v in self.views.sizes[item.row])  # as displayed: the manifest's sizes
        grid = (item.resolution // self.patch,) * 2
        rng = np.random.default_rng(list(item.seed))
        first = next(iter(self.teachers.values()))[item.partition]
        view_box, view_grid = self.views.box(first, item.row), self.reader(first).spec.grid
        if item.seed:
            crop = geometry.sample_crop(rng, (W, H), view_box, view_grid, grid, self.crop)
        else:  # evaluation: the first teacher's whole view, unflipped
            crop = geometry.Crop(box=view_box, flip=False, aligned=True)
        other = geometry.sample_crop(rng, (W, H), view_box, view_grid, grid, self.crop) \
            if self.mesa and item.seed else None
        windows = {}
        for views in self.teachers.values() if self.teacher_inputs is None else ():
            key = views[item.partition]
            windows[key] = geometry.window_for(crop.box, self.views.box(key, item.row), self.reader(key).spec.grid)
        return crop, other, windows

    def _sample(self, item: Item, plan: tuple, data: bytes | None = None) -> dict:
        pixels = self._pixels(item, plan, data)
        if self.teacher_inputs is not None:
            return {**self._online(item, plan, pixels.pop("teachers")), **pixels}
        return {**self._features(item, plan), **pixels}

    def _pixels(self, item: Item, plan: tuple, data: bytes | None = None) -> dict:
        """The sample's student inputs: its crop (and MESA's second crop) as uint8."""
        crop, other, _ = plan
        W, H = (int(v) for v in self.views.sizes[item.row])
        size = grid_px((item.resolution // self.patch,) * 2, self.patch)
        image, scale = self.image(item.row, reduction([c.box for c in (crop, other) if c is not None], size), data)
        if image.size != (-(-W // scale), -(-H // scale)):
            raise UsageError(f"{self.views.uris[item.row]}: {image.size[0] * scale}x{image.size[1] * scale} pixels, "
                             f"not the {W}x{H} indexed (changed since indexing?)")
        out = {"image": crop_pixels(image, crop.box, size, crop.flip, scale)}
        if other is not None:
            out["image2"] = crop_pixels(image, other.box, size, other.flip, scale)
        if self.teacher_inputs is not None:  # each teacher sees the crop's box unflipped, as a view sees its box,
            if scale != 1:  # and in the pixels extraction decoded (no JPEG reduction); the student's stay as cached runs'
                image, scale = self.image(item.row, 1, data)
            channels = float_channels(image)
            out["teachers"] = {key: crop_float(channels, crop.box, s, scale, resize)
                               for key, (s, resize) in self._inputs(item.partition).items()}
        return out

    def _inputs(self, partition: str) -> dict[str, tuple[tuple[int, int], str]]:
        """The online teacher inputs (size, resize) of ``partition``'s views."""
        return {views[partition]: self.teacher_inputs[views[partition]] for views in self.teachers.values()}

    def _online(self, item: Item, plan: tuple, inputs: dict[str, torch.Tensor]) -> dict:
        """The sample's online parts: per teacher its input pixels, the map from the student grid onto
        the grid of the teacher's whole input (the crop itself), that grid as extent, and Ω (every
        student cell: the teacher saw exactly the crop)."""
        crop, other, _ = plan
        grid = (item.resolution // self.patch,) * 2
        sample = {**self._head(item, crop, other, grid), "bytes": 0}
        for name, views in self.teachers.items():
            key = views[item.partition]
            view_grid = self.reader(key).spec.grid
            m = geometry.cell_map(crop.box, grid, crop.box, view_grid, crop.flip)
            sample[name] = {"pixels": inputs[key], "key": key, "map": torch.from_numpy(m.as_array()),
                            "extent": torch.tensor(view_grid),
                            "omega": torch.from_numpy(geometry.omega(crop.box, grid, crop.box, crop.flip))}
        return sample

    def _head(self, item: Item, crop: geometry.Crop, other: geometry.Crop | None, grid: tuple[int, int]) -> dict:
        """What a sample says of its crops whatever the targets: row, box, flip, partition, MESA's map."""
        sample = {"row": item.row, "box": torch.tensor(crop.box, dtype=torch.float64), "flip": crop.flip,
                  "partition": item.partition}
        if other is not None:
            m = geometry.crop_to_crop_map(other.box, grid, other.flip, crop.box, grid, crop.flip)
            sample["mesa"] = {"map": torch.from_numpy(m.as_array()),
                              "omega": torch.from_numpy(geometry.omega(other.box, grid, crop.box, other.flip))}
        return sample

    def _features(self, item: Item, plan: tuple, dense: bool = True) -> dict:
        """The sample's targets: per teacher its window (without ``dense``, an empty one of the right
        dtype: :func:`_window_batch` makes room), map, extent, Ω and summary; MESA's crop-to-crop map."""
        crop, other, windows = plan
        grid = (item.resolution // self.patch,) * 2
        sample = self._head(item, crop, other, grid)
        read = {key: self.views.read(item.row, {key: w}, self.views.device_space(key), dense)[key]
                for key, w in windows.items()}
        for key, r in read.items():
            spec, stored = self.reader(key).spec, self.views.device_space(key) == "stored"
            r["channels"] = spec.stored_channels if stored else spec.channels
            r["dtype"] = _TORCH[np.dtype(spec.dtype) if stored else np.dtype(np.float32)]
        sample["bytes"] = sum(r["bytes"] for r in read.values())
        for name, views in self.teachers.items():
            key = views[item.partition]
            sample[name] = self._targets(read[key], windows[key], self.reader(key).spec.grid, crop, grid)
            sample[name]["key"] = key
        return sample

    @staticmethod
    def _targets(read: dict, window, view_grid, crop: geometry.Crop, grid: tuple[int, int]) -> dict:
        """One teacher's part of a sample: its window (h, w, C) as read (f16 stays f16: the device
        converts), the map from the student grid into the window, the window's extent, Ω and the
        raw summary."""
        r0, r1, c0, c1 = window
        m = geometry.cell_map(crop.box, grid, read["box"], view_grid, crop.flip).shifted(r0, c0)
        dense = read["dense"]
        out = {"window": torch.from_numpy(np.require(dense, requirements=["W"])) if dense is not None else
               torch.empty((0, 0, read["channels"]), dtype=read["dtype"]),  # the shape and dtype a later read fills
               "map": torch.from_numpy(m.as_array()), "extent": torch.tensor([r1 - r0, c1 - c0]),
               "omega": torch.from_numpy(geometry.omega(crop.box, grid, read["box"], crop.flip))}
        if read["summary"] is not None:
            out["summary"] = torch.from_numpy(read["summary"].astype(np.float32))
        return out


_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8}


def retrying(read, doing: str, attempts: int | None = None):
    """``read()``, tried again after a transient error (a lost connection, a busy server: the rule
    extract applies to shards, ``featcache.retry.is_transient``) with the same back-off, saying so on
    stderr; after ``attempts`` (:data:`MAX_READ_ATTEMPTS`) tries one line, exit 1 (a StorageError), and
    ``--resume`` continues."""
    attempts = attempts or MAX_READ_ATTEMPTS
    for n in range(1, attempts + 1):
        try:
            return read()
        except Exception as e:
            if not is_transient(e):
                raise
            if n == attempts:
                raise StorageError(f"{doing} failed {n} times ({describe(e)}); when the storage answers again, "
                                   "continue with 'featcache train --out RUN --resume'", getattr(e, "errno", None)) from e
            print(f"{doing}: attempt {n} failed ({describe(e)}); retrying", file=LogStream(), flush=True)
            time.sleep(min(15.0, 2.0 ** (n - 1)))


def grid_px(grid: tuple[int, int], patch: int) -> tuple[int, int]:
    return grid[0] * patch, grid[1] * patch


def collate(samples: list[dict], windows: dict[str, torch.Tensor] | None = None) -> dict:
    """Stack a batch; each teacher's windows (h, w, C), in their stored dtype, are padded to the
    batch's largest (their real extents travel with them, so the lookup never reads the padding).
    ``windows``: a teacher's batch of windows already in place (:meth:`CacheDataset.__getitems__`);
    a batch that dataset already assembled passes as it is."""
    if isinstance(samples, dict):
        return samples
    out = {"row": torch.tensor([s["row"] for s in samples]), "image": torch.stack([s["image"] for s in samples]),
           "box": torch.stack([s["box"] for s in samples]), "flip": torch.tensor([s["flip"] for s in samples]),
           "bytes": sum(s["bytes"] for s in samples), "partition": samples[0]["partition"]}
    for name in [k for k, v in samples[0].items() if isinstance(v, dict) and "key" in v]:
        parts = [s[name] for s in samples]
        batch = (windows or {}).get(name)
        out[name] = {"key": parts[0]["key"], "map": torch.stack([p["map"] for p in parts]),
                     "extent": torch.stack([p["extent"] for p in parts]), "omega": torch.stack([p["omega"] for p in parts])}
        if "pixels" in parts[0]:  # online targets: the teacher's inputs, run on the training device
            out[name]["pixels"] = torch.stack([p["pixels"] for p in parts])
        else:
            out[name]["window"] = _window_batch(parts) if batch is None else batch
        if "summary" in parts[0]:
            out[name]["summary"] = torch.stack([p["summary"] for p in parts])
    if "image2" in samples[0]:
        out["image2"] = torch.stack([s["image2"] for s in samples])
        out["mesa"] = {"map": torch.stack([s["mesa"]["map"] for s in samples]),
                       "omega": torch.stack([s["mesa"]["omega"] for s in samples])}
    return out


def _window_batch(parts: list[dict]) -> torch.Tensor:
    """One teacher's windows padded to the largest, the padding zeroed (empty windows: room left)."""
    hmax = max(int(p["extent"][0]) for p in parts)
    wmax = max(int(p["extent"][1]) for p in parts)
    first = parts[0]["window"]
    windows = _batch_buffer((len(parts), hmax, wmax, first.shape[2]), first.dtype)
    for k, p in enumerate(parts):
        h, w = (int(v) for v in p["extent"])
        if p["window"].numel():
            windows[k, :h, :w] = p["window"]
        windows[k, h:].zero_()
        windows[k, :h, w:].zero_()
    return windows


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor for a batch, in shared memory inside a DataLoader worker: the batch
    then reaches the training process without the copy into shared memory its pickling would make
    (tens of MB per batch of windows)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def to_device(batch, device: torch.device, non_blocking: bool = False):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def split_rows(cache: Cache, rows: np.ndarray, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): by the manifest's ``split`` column ("train" trains, anything else
    is held out) when it has one, else a seeded ``heldout`` fraction."""
    manifest = cache.manifest
    if "split" in manifest.column_names:
        split = np.asarray(manifest.column("split").to_pylist(), dtype=object)[rows]
        train = np.array([s == "train" for s in split], dtype=bool)
        return rows[train], rows[~train]
    n_out = int(round(heldout * len(rows)))
    perm = np.random.default_rng([seed, 7]).permutation(len(rows))
    held = np.zeros(len(rows), dtype=bool)
    held[perm[:n_out]] = True
    return rows[~held], rows[held]
