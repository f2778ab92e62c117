"""The per-shard work of ``extract``, as a plain library class that runs without Ray.

A ``ShardWorker`` loads its teachers once, then for each shard it is given: reads and decodes the
shard's images on a thread pool (the next shard's images are decoded while this one computes),
builds every view (box crop + resize + normalize, batched, on the teacher's device), runs the
teachers, writes each view's whole shard and commits it. Images that cannot be used are written as
zero rows with ``valid = 0`` and their reason goes into the commit (the driver gathers the reasons
into ``errors.parquet``). It returns a small JSON-ready record; features never leave the worker
except into the cache. ``pipelines/extract.py`` runs these inside Ray actors.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from featcache.decode import decode
from featcache.errors import FeatcacheError, ImageError, UsageError
from featcache.extract.plan import ViewTask
from featcache.fsio import locate
from featcache.teachers.views import make_views
from featcache.manifest import CHANGED, changed_since_indexing
from featcache.retry import storage_errors
from featcache.stats.calibrate import Calibration
from featcache.store.cache import Cache
from featcache.store import tables
from featcache.store.codec import Int8Phis, load_int8_phis
from featcache.store.zarrio import as_dtype
from featcache.teachers import TeacherSpec, create_teacher

#: spec fields a worker's loaded teacher may differ in from the driver's description
_UNCHECKED = ("weights_hash",)


class ShardWorker:
    """Computes and commits whole shards of one cache's views."""

    def __init__(self, root: str, teachers: list[dict], views: list[dict], device: str = "cpu",
                 batch_size: int = 16, view_policy: str = "squash", decode_threads: int = 4,
                 max_pixels: int = 2 * 89_478_485, info: dict | None = None):
        self.cache = Cache.open(root)
        self.cache.check_manifest()  # every job checks the rows it writes are the cache's rows
        manifest = self.cache.manifest
        self.uris = manifest.column("uri").to_pylist()
        self.sizes, self.mtimes = tables.file_column(manifest, "size"), tables.file_column(manifest, "mtime")
        self.device = torch.device(device)
        self.batch_size, self.policy, self.max_pixels = batch_size, view_policy, max_pixels
        self.info = dict(info or {})
        self.views = [ViewTask.from_dict(v) for v in views]
        self.cache_views = {v.key: self.cache.view(v.key) for v in self.views}
        self.shard_range = next(iter(self.cache_views.values())).shard_range  # every view shares the layout
        self.teachers = [self._load(TeacherSpec.from_dict(t)) for t in teachers]
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")  # never waits on itself
        self._prefetched: dict[int, Future] = {}
        self._codecs: dict[str, Int8Phis] = {}
        self._progress = {"shard": None, "units": 0, "views": 1}

    def progress(self) -> dict:
        """The shard being processed and how many of its images are done (read from another
        thread while :meth:`process` runs: the driver's progress bar moves per batch)."""
        p = dict(self._progress)
        return {"shard": p["shard"], "images": p["units"] // max(1, p["views"])}

    def _load(self, expected: TeacherSpec):
        teacher = create_teacher(expected.family, expected.source, expected.revision, device=str(self.device),
                                 name=expected.name, hash_weights=False)
        got = dataclasses.replace(teacher.spec, weights_hash=expected.weights_hash)
        if got != expected:
            diff = [f.name for f in dataclasses.fields(TeacherSpec) if getattr(got, f.name) != getattr(expected, f.name)]
            raise UsageError(f"{expected.source} loaded on {os.uname().nodename} differs from the driver's "
                             f"description in {', '.join(diff)}: is it the same model on every node?")
        return teacher

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- decoding -------------------------------------------------------------------------

    def prefetch(self, shard: int | None) -> None:
        """Start decoding ``shard``'s images in the background."""
        if shard is not None and shard not in self._prefetched:
            self._prefetched[shard] = self._prefetcher.submit(self._decode_shard, shard)

    def _decode_shard(self, shard: int) -> list:
        start, stop = self.shard_range(shard)
        return list(self.pool.map(self._decode_one, range(start, stop)))

    def _decode_one(self, i: int):
        uri = self.uris[i]
        try:
            loc = locate(uri)
            data = loc.read_bytes()
            changed = changed_since_indexing(loc, data, self.sizes[i], self.mtimes[i])
        except FileNotFoundError:
            return ImageError(uri, "file not found (deleted since indexing?)")
        except (OSError, ValueError) as e:
            return ImageError(uri, f"cannot read: {type(e).__name__}: {e}")
        if changed:  # never extract other bytes than those the manifest describes
            return ImageError(uri, CHANGED)
        try:
            return decode(data, uri, self.max_pixels)
        except ImageError as e:
            return e

    def images(self, shard: int) -> list:
        """Decoded images of ``shard`` (uint8 (3, H, W) tensors, or ImageError)."""
        future = self._prefetched.pop(shard, None)
        return self._decode_shard(shard) if future is None else future.result()

    # ---- one shard ------------------------------------------------------------------------

    def process(self, shard: int, views: list[str] | None = None, prefetch: int | None = None) -> dict:
        """Compute, write and commit ``shard`` for ``views`` (all by default); returns a record.

        Storage that refuses the write for good (full, read-only) raises a StorageError; a view
        whose write failed is left uncommitted (its marker is written last)."""
        t0 = time.perf_counter()
        images = self.images(shard)
        self.prefetch(prefetch)
        t_decoded = time.perf_counter()
        start, stop = self.shard_range(shard)
        failed = {start + j: f"decode: {im.reason}" for j, im in enumerate(images) if isinstance(im, ImageError)}
        good = [j for j, im in enumerate(images) if not isinstance(im, ImageError)]
        wanted = set(views) if views is not None else {v.key for v in self.views}
        self._progress = {"shard": shard, "units": len(failed) * len(wanted), "views": len(wanted)}
        compute = write = 0.0
        for task in (v for v in self.views if v.key in wanted):
            t1 = time.perf_counter()
            dense, summary, box, errors = self._compute(task, images, good, start, stop)
            t2 = time.perf_counter()
            info = {**self.info, "seconds": round(t2 - t1, 3)}
            if task.key in self._codecs:  # which statistics the codes were written with
                info["stats_hash"] = self._codecs[task.key].stats_hash
            view = self.cache_views[task.key]
            with storage_errors(f"writing shard {shard} of {task.key} to {view.loc.uri}"):
                view.write_shard(start, dense, summary, box, errors={**failed, **errors}, info=info)
            compute, write = compute + t2 - t1, write + time.perf_counter() - t2
        return {"shard": shard, "views": sorted(wanted), "images": stop - start, "failed": len(failed), "pid": os.getpid(),
                "seconds": {"decode_wait": round(t_decoded - t0, 3), "compute": round(compute, 3),
                            "write": round(write, 3), "total": round(time.perf_counter() - t0, 3)},
                **self.info}

    def _features(self, task: ViewTask, images: list, good: list[int]):
        """(rows, dense, summary, boxes) per batch of ``good`` images: the teacher's float outputs
        as tensors on the teacher's device."""
        teacher = self.teachers[task.teacher]
        per_batch = self.batch_size * task.mosaic ** 2
        for b in range(0, len(good), per_batch):
            rows = good[b:b + per_batch]
            pixels, boxes = make_views([images[j] for j in rows], teacher.spec, size=task.size,
                                       policy=self.policy, device=self.device, mosaic=task.mosaic)
            out = teacher.extract_mosaic(pixels, task.mosaic) if task.mosaic > 1 else teacher.extract(pixels)
            yield rows, out.dense, out.summary, boxes

    def _compute(self, task: ViewTask, images: list, good: list[int], start: int, stop: int):
        view = self.cache_views[task.key]
        spec, n = view.spec, stop - start
        codec = self._codec(task.key) if spec.codec == "int8-phis" else None
        dtype = view.group["dense"].dtype
        dense = np.zeros((n, *spec.grid, spec.channels), dtype=dtype)
        summary = np.zeros((n, spec.summary_channels), dtype=view.group["summary"].dtype)
        box = np.zeros((n, 4), dtype=np.float32)
        errors: dict[int, str] = {}
        for rows, d, s, boxes in self._features(task, images, good):
            finite = _finite_rows(d, s)
            if codec is not None:
                dense[rows] = codec.encode(torch.nan_to_num(d)).cpu().numpy()
            else:
                dense[rows] = as_dtype(d.cpu().numpy(), dtype)
            summary[rows], box[rows] = as_dtype(s.cpu().numpy(), summary.dtype), boxes.numpy()
            for r, ok in zip(rows, finite):
                if not ok:
                    errors[start + r] = "teacher: non-finite features"
            self._progress["units"] += len(rows)
        return dense, summary, box, errors

    def _codec(self, key: str) -> Int8Phis:
        """The view's int8-phis transform, read once its calibration is in the cache."""
        if key not in self._codecs:
            self._codecs[key] = load_int8_phis(self.cache_views[key])
        return self._codecs[key]

    # ---- int8-phis calibration ------------------------------------------------------------

    def calibrate(self, key: str, rows: list[int], seed: int = 0) -> dict:
        """Fit the PHI-S statistics and int8 scale of view ``key`` on the images ``rows`` (float
        features, nothing written); the driver stores the result with ``store_calibration``."""
        task = next(v for v in self.views if v.key == key)
        spec = self.cache_views[key].spec
        t0 = time.perf_counter()
        calibration = Calibration(spec.channels, len(rows) * spec.grid[0] * spec.grid[1], seed)
        per_batch = self.batch_size * task.mosaic ** 2
        for b in range(0, len(rows), per_batch):  # one batch of images decoded at a time
            images = list(self.pool.map(self._decode_one, rows[b:b + per_batch]))
            good = [j for j, im in enumerate(images) if not isinstance(im, ImageError)]
            for _, d, s, _ in self._features(task, images, good):
                ok = _finite_rows(d, s)
                if ok.any():
                    calibration.add(d.cpu().numpy()[ok], s.cpu().numpy()[ok])
        if calibration.images == 0:
            raise FeatcacheError(f"{key}: none of the {len(rows)} calibration images could be used")
        result = calibration.finish()
        result["quantization"]["calibration"]["seconds"] = round(time.perf_counter() - t0, 3)
        return result


def _finite_rows(dense: torch.Tensor, summary: torch.Tensor) -> np.ndarray:
    """Per image row: True when its dense and summary features are all finite."""
    return (torch.isfinite(dense).flatten(1).all(dim=1) & torch.isfinite(summary).all(dim=1)).cpu().numpy()
