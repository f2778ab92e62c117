"""The per-shard work of ``extract``, as a plain library class that runs without Ray.

A ``ShardWorker`` loads its teachers once, then for each shard it is given: reads and decodes the
shard's images on a thread pool, builds every view (box crop + resize + normalize, batched, on the
teacher's device), runs the teachers, converts the features to the stored dtype on the device,
copies them to host memory (pinned, non-blocking, on a side stream on CUDA), writes each view's
whole shard and commits it. Images that cannot be used are written as zero rows with ``valid = 0``
and their reason goes into the commit (the driver gathers the reasons into ``errors.parquet``). It
returns a small JSON-ready record; features never leave the worker except into the cache.
``pipelines/extract.py`` runs these inside Ray actors.

Overlap (``write_queue`` > 0, the default). The driver treats a returned record as a committed
shard (progress, resume) and calls ``process(N, prefetch=N+1)`` one shard at a time, naming the
next shard it will ask for. So ``process(N)`` returns only once every view of N is committed (a
record returned before its writes ended would be counted, and skipped on resume, as a committed
shard it may never become), and the overlap comes from looking ahead instead: a compute thread runs
shard N's views and then, speculatively, shard N+1's, while a writer thread writes N's views in
order (view k is written while view k+1 computes; N's last view while N+1 computes). Between the
two threads a queue of at most ``write_queue`` computed views gives back-pressure. Nothing is
written for a shard before its own ``process`` call: a look-ahead waits in the queue, and is
dropped if the next call asks for another shard (so a stopping job commits nothing it did not
ask for; the price is one shard computed in vain). A view's commit marker is still written last,
by ``View.write_shard``; an error of the writer or compute thread is raised by the ``process`` call
of its shard, unchanged. ``progress()`` follows the compute thread. ``write_queue=0`` computes and
writes in the caller's thread, one view after the other: the same bytes, later.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from featcache.decode import decode
from featcache.errors import FeatcacheError, ImageError, StorageError, UsageError
from featcache.extract.plan import ViewTask
from featcache.retry import storage_error, storage_errors
from featcache.sources.read import ImageReader, RowGroups
from featcache.stats.calibrate import Calibration
from featcache.store.cache import Cache
from featcache.store.codec import Codec
from featcache.teachers import TeacherSpec, create_teacher
from featcache.upsample.checkpoint import load_upsampler

#: spec fields a worker's loaded teacher may differ in from the driver's description
_UNCHECKED = ("weights_hash",)
#: A shard's record["seconds"]: decode_wait (for its decoded images); views, forward, encode (to the
#: stored dtype or int8 codes, and the finiteness check), d2h (copy to host memory), by the wall clock
#: on the CPU and by CUDA events (device time) on CUDA; compute (the compute thread's wall time for
#: the views: on the CPU about views + forward + encode + d2h); queue_wait (computed views waiting for
#: room in the write queue: the writer is behind); write (write_shard: objects and commit markers);
#: overlapped (how much of all these ran beside other work: look-ahead before the call, a write
#: beside a compute); total (the process() call). decode_wait + compute + queue_wait + write -
#: overlapped = total, up to thread hand-offs.
STAGES = ("decode_wait", "views", "forward", "encode", "d2h", "compute", "queue_wait", "write")
_DEVICE_STAGES = ("views", "forward", "encode", "d2h")
NON_FINITE = "teacher: non-finite features"


class ShardWorker:
    """Computes and commits whole shards of one cache's views.

    ``write_queue``: how many computed views may wait for the writer thread (0: no threads, each
    view computed and then written by the caller); ``compile``: ``torch.compile`` the teachers' forwards.
    """

    def __init__(self, root: str, teachers: list[dict], views: list[dict], device: str = "cpu",
                 batch_size: int = 16, view_policy: str = "squash", decode_threads: int = 4,
                 max_pixels: int = 2 * 89_478_485, info: dict | None = None, write_queue: int = 1,
                 compile: bool = False):
        self.cache = Cache.open(root)
        self.cache.check_manifest()  # every job checks the rows it writes are the cache's rows
        self.reader = ImageReader(self.cache.manifest)  # loose files, tar members, Parquet rows
        self.device = torch.device(device)
        self.batch_size, self.policy, self.max_pixels = batch_size, view_policy, max_pixels
        self.info = dict(info or {})
        self.views = [ViewTask.from_dict(v) for v in views]
        self.cache_views = {v.key: self.cache.view(v.key) for v in self.views}
        #: what the summaries are cast to on the device (the dense features: each view's codec encodes them)
        self._summary_dtypes = {k: _device_dtype(v.group["summary"].dtype) for k, v in self.cache_views.items()}
        self.shard_range = next(iter(self.cache_views.values())).shard_range  # every view shares the layout
        self.teachers = [self._load(TeacherSpec.from_dict(t), compile) for t in teachers]
        self.upsamplers = {v.key: self._load_upsampler(v) for v in self.views if v.upsampler}
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")  # never waits on itself
        self._prefetched: dict[int, Future] = {}
        self._codecs: dict[str, Codec] = {}
        self._copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._computing: _Job | None = None  # what progress() reports
        self.write_queue, self._ahead = write_queue, None
        if write_queue > 0:
            self._todo: queue.Queue = queue.Queue()
            self._outbox: queue.Queue = queue.Queue(maxsize=write_queue)
            for loop, name in ((self._compute_loop, "compute"), (self._write_loop, "writer")):
                threading.Thread(target=loop, name=f"featcache-{name}", daemon=True).start()

    def progress(self) -> dict:
        """The shard being computed and how many of its images are done (read from another thread
        while :meth:`process` runs: the driver's progress bar moves per batch). With overlap this
        is the look-ahead shard once the current one is computed and only being written."""
        job = self._computing
        if job is None:
            return {"shard": None, "images": 0}
        return {"shard": job.shard, "images": job.units // max(1, len(job.views))}

    def _load(self, expected: TeacherSpec, compile: bool):
        teacher = create_teacher(expected.family, expected.source, expected.revision, device=str(self.device),
                                 name=expected.name, hash_weights=False, compile=compile)
        got = dataclasses.replace(teacher.spec, weights_hash=expected.weights_hash)
        if got != expected:
            diff = [f.name for f in dataclasses.fields(TeacherSpec) if getattr(got, f.name) != getattr(expected, f.name)]
            raise UsageError(f"{expected.source} loaded on {os.uname().nodename} differs from the driver's "
                             f"description in {', '.join(diff)}: is it the same model on every node?")
        return teacher

    def _load_upsampler(self, task: ViewTask):
        """The upsampler of an upsampled view, refused when its checkpoint is not the one the view records."""
        model, description = load_upsampler(task.upsampler, self.device)
        recorded = self.cache_views[task.key].spec.upsampler or {}
        if description.sha256 != recorded.get("sha256"):
            raise UsageError(f"{task.upsampler} on {os.uname().nodename} is not the upsampler {task.key} was "
                             f"planned with ({recorded.get('sha256', '?')[:19]}): is it the same checkpoint on every node?")
        return model

    def close(self) -> None:
        """Drop a look-ahead and let the threads end (they are daemons: nothing waits for them)."""
        if self._ahead is not None:
            self._ahead.cancel()
        if self.write_queue > 0:
            self._todo.put(None)
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- decoding -------------------------------------------------------------------------

    def prefetch(self, shard: int | None) -> None:
        """Start decoding ``shard``'s images in the background."""
        if shard is not None and shard not in self._prefetched:
            self._prefetched[shard] = self._prefetcher.submit(self._decode_shard, shard)

    def _decode_shard(self, shard: int) -> list:
        start, stop = self.shard_range(shard)
        groups = RowGroups()  # a Parquet row group is read once for all of the shard's rows in it
        return list(self.pool.map(functools.partial(self._decode_one, groups=groups), range(start, stop)))

    def _decode_one(self, i: int, groups: RowGroups | None = None):
        try:
            data = self.reader.read(i, groups)  # never other bytes than those the manifest describes
            image = decode(data, self.reader.uris[i], self.max_pixels)
        except ImageError as e:
            return e
        return image.pin_memory() if self._copies is not None else image  # copied to the device without a wait

    def images(self, shard: int) -> list:
        """Decoded images of ``shard`` (uint8 (3, H, W) tensors, or ImageError)."""
        future = self._prefetched.pop(shard, None)
        return self._decode_shard(shard) if future is None else future.result()

    # ---- one shard ------------------------------------------------------------------------

    def process(self, shard: int, views: list[str] | None = None, prefetch: int | None = None) -> dict:
        """Compute, write and commit ``shard`` for ``views`` (all by default); returns its record
        once every view is committed. ``prefetch``: the shard the next call will ask for; its
        images are decoded, and (with overlap) its features computed, while this one is written.

        Storage that refuses the write for good (full, read-only) raises a StorageError; a view
        whose write failed is left uncommitted (its marker is written last)."""
        t0 = time.perf_counter()
        wanted = [v.key for v in self.views if views is None or v.key in views]
        if self.write_queue > 0:
            job = self._overlapped(shard, wanted, prefetch)
        else:
            job = self._new_job(shard, wanted)
            self.prefetch(prefetch)
            job.release(wanted)
            for out in self._compute_views(job):
                self._write(job, out)
        if job.error is not None:
            raise job.error
        return self._record(job, wanted, t0)

    def _overlapped(self, shard: int, wanted: list[str], prefetch: int | None) -> "_Job":
        """Release ``shard``'s job (the look-ahead of the last call when it computes these views),
        queue the next call's shard as the new look-ahead, wait until every view is written."""
        job, self._ahead = self._ahead, None
        if job is None or job.shard != shard or not set(wanted) <= {v.key for v in job.views}:
            if job is not None:
                job.cancel()
            job = self._submit(shard, wanted)
        if prefetch is not None:
            self._ahead = self._submit(prefetch, wanted)
        job.release(wanted)
        job.done.wait()
        return job

    def _new_job(self, shard: int, wanted: list[str]) -> "_Job":
        self.prefetch(shard)
        start, stop = self.shard_range(shard)
        return _Job(shard, [v for v in self.views if v.key in wanted], start, stop, _Stages(self.device))

    def _submit(self, shard: int, wanted: list[str]) -> "_Job":
        job = self._new_job(shard, wanted)
        self._todo.put(job)
        return job

    def _record(self, job: "_Job", wanted: list[str], t0: float) -> dict:
        total = time.perf_counter() - t0
        s = job.stages.seconds
        busy = s["decode_wait"] + s["compute"] + s["queue_wait"] + s["write"]
        seconds = {k: round(s[k], 3) for k in STAGES}
        seconds.update(overlapped=round(max(0.0, busy - total), 3), total=round(total, 3))
        return {"shard": job.shard, "views": sorted(wanted), "images": job.stop - job.start,
                "failed": len(job.failed), "pid": os.getpid(), "seconds": seconds, **self.info}

    # ---- the two threads ------------------------------------------------------------------

    def _compute_loop(self) -> None:
        if self._copies is not None:
            torch.cuda.set_device(self._copies.device)  # the current device is per thread (an index here)
        while (job := self._todo.get()) is not None:
            try:
                for out in self._compute_views(job):
                    with job.stages.time("queue_wait"):
                        self._outbox.put((job, out))  # blocks while the writer is behind: back-pressure
            except BaseException as e:  # noqa: BLE001  carried to process(), which raises it
                job.error = e
            self._outbox.put((job, None))
        self._outbox.put(None)

    def _write_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            job, out = item
            if out is None:  # the job's last view has been through here
                job.done.set()
                continue
            job.released.wait()  # nothing of a shard is written before its process() call
            if job.stopped or out.key not in job.wanted:
                continue
            try:
                self._write(job, out)
            except BaseException as e:  # noqa: BLE001  carried to process(), which raises it
                job.error = e

    def _write(self, job: "_Job", out: "_ViewOutput") -> None:
        view = self.cache_views[out.key]
        with job.stages.time("write"), _shard_errors(f"writing shard {job.shard} of {out.key} to {view.loc.uri}"):
            view.write_shard(job.start, out.dense, out.summary, out.box, errors=out.errors, info=out.info)

    # ---- computing ------------------------------------------------------------------------

    def _compute_views(self, job: "_Job"):
        """Each of the job's views in turn, computed and in host memory (a generator: the caller
        writes or queues one view while the next is not computed yet)."""
        if job.stopped:  # a look-ahead dropped before it began
            return
        self._computing = job
        with job.stages.time("decode_wait"):
            images = self.images(job.shard)
        job.failed = {job.start + j: f"decode: {im.reason}" for j, im in enumerate(images)
                      if isinstance(im, ImageError)}
        good = [j for j, im in enumerate(images) if not isinstance(im, ImageError)]
        job.units += len(job.failed) * len(job.views)
        for task in job.views:
            if job.stopped:
                return
            t = time.perf_counter()
            dense, summary, box, errors = self._compute(task, images, good, job)
            seconds = time.perf_counter() - t
            job.stages.seconds["compute"] += seconds
            info = {**self.info, "seconds": round(seconds, 3), **self._codec(task.key).commit_info()}
            yield _ViewOutput(task.key, dense, summary, box, {**job.failed, **errors}, info)

    def _compute(self, task: ViewTask, images: list, good: list[int], job: "_Job"):
        """One view of the job's shard: (dense, summary, box) as host arrays in the stored dtypes,
        and the rows whose features are not finite."""
        spec, n = self.cache_views[task.key].spec, job.stop - job.start
        summary_dtype = self._summary_dtypes[task.key]
        encode, dense_dtype = self._encoder(task.key)
        host = _HostShard((n, *spec.grid, spec.stored_channels), dense_dtype, (n, spec.summary_channels), summary_dtype,
                          good, self._copies, job.stages)
        for rows, d, s, boxes in self._features(task, images, good, job.stages, dtype=None):
            if job.stopped:
                break
            with job.stages.time("encode"):
                finite = _finite_rows(d, s)
                d, s = encode(d), s.to(summary_dtype)
            host.put(rows, d, s, finite, boxes)
            job.units += host.settle()  # progress counts the batches that reached the host
        job.units += host.settle(final=True)
        job.stages.settle()
        finite = host.finite.numpy()
        errors = {job.start + r: NON_FINITE for r in good if not finite[r]}
        return host.dense.numpy(), host.summary.numpy(), host.box, errors

    def _features(self, task: ViewTask, images: list, good: list[int], stages: "_Stages",
                  dtype: torch.dtype | None = torch.float32):
        """(rows, dense, summary, boxes) per batch of ``good`` images: the teacher's outputs (in
        ``dtype``; ``None``: the forward's own) as tensors on the teacher's device, as the view's
        kind (plain, mosaic, upsampled: ``featcache.extract.viewkinds``) runs the teacher."""
        teacher, kind = self.teachers[task.teacher], task.kind
        per_batch = kind.images_per_batch(self.batch_size)
        for b in range(0, len(good), per_batch):
            rows = good[b:b + per_batch]
            with stages.time("views"):
                batch = [images[j].to(self.device, non_blocking=True) for j in rows]
                pixels, boxes = kind.views(teacher.spec, batch, self.policy, self.device)
            with stages.time("forward"):
                dense, summary = kind.features(teacher, pixels, dtype, self.batch_size, self.upsamplers.get(task.key))
            yield rows, dense, summary, boxes

    def _encoder(self, key: str):
        """(device features → the view's stored dense values, on the device: its codec's encoding, e.g.
        int8-phis codes or a cast; the dtype they come in)."""
        codec = self._codec(key)
        return codec.encode, codec.torch_dtype

    def _codec(self, key: str) -> Codec:
        """The view's codec, read once (an int8-phis one once its calibration is in the cache)."""
        if key not in self._codecs:
            self._codecs[key] = self.cache_views[key].spec.codec_type.open(self.cache_views[key])
        return self._codecs[key]

    # ---- codec calibration (int8-phis, int4-pca) ------------------------------------------------------------

    def calibrate(self, key: str, rows: list[int], seed: int = 0) -> dict:
        """Fit the PHI-S statistics and codec parameters of view ``key`` on the images ``rows`` (float
        features, nothing written); the driver stores the result with ``store_calibration``."""
        task = next(v for v in self.views if v.key == key)
        spec = self.cache_views[key].spec
        t0 = time.perf_counter()
        calibration = Calibration(spec.channels, len(rows) * spec.grid[0] * spec.grid[1], seed, spec.codec_type)
        per_batch = task.kind.images_per_batch(self.batch_size)
        for b in range(0, len(rows), per_batch):  # one batch of images decoded at a time
            decode_one = functools.partial(self._decode_one, groups=RowGroups())
            images = list(self.pool.map(decode_one, rows[b:b + per_batch]))
            good = [j for j, im in enumerate(images) if not isinstance(im, ImageError)]
            for _, d, s, _ in self._features(task, images, good, _Stages(self.device)):
                ok = _finite_rows(d, s).cpu().numpy()
                if ok.any():
                    calibration.add(d.cpu().numpy()[ok], s.cpu().numpy()[ok])
        if calibration.images == 0:
            raise FeatcacheError(f"{key}: none of the {len(rows)} calibration images could be used")
        result = calibration.finish()
        result["quantization"]["calibration"]["seconds"] = round(time.perf_counter() - t0, 3)
        return result


@dataclasses.dataclass(eq=False)
class _Job:
    """One shard on its way through the worker: its views computed, then written, in order."""

    shard: int
    views: list[ViewTask]  # the views computed (the call may want fewer of them written)
    start: int
    stop: int
    stages: "_Stages"
    units: int = 0  # image-views computed: progress
    failed: dict = dataclasses.field(default_factory=dict)  # decode failures: row -> reason
    wanted: frozenset = frozenset()
    error: BaseException | None = None
    cancelled: bool = False
    released: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def stopped(self) -> bool:
        return self.cancelled or self.error is not None

    def release(self, wanted: list[str]) -> None:
        """Its process() call came: write ``wanted``."""
        self.wanted = frozenset(wanted)
        self.released.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.released.set()


@dataclasses.dataclass
class _ViewOutput:
    """One view of one shard, computed, in host memory, in its stored dtypes: what write_shard takes."""

    key: str
    dense: np.ndarray
    summary: np.ndarray
    box: np.ndarray
    errors: dict
    info: dict


class _Stages:
    """Seconds per stage of one shard. Host stages by the wall clock; on CUDA the device stages
    (views, forward, encode, d2h) by CUDA events, read in ``settle`` once that work is done (timing
    never stalls the device queue)."""

    def __init__(self, device: torch.device):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.cuda = device.type == "cuda"
        self._events: list = []

    @contextmanager
    def time(self, stage: str, stream=None):
        if self.cuda and stage in _DEVICE_STAGES:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            yield
            end.record(stream)
            self._events.append((stage, begin, end))
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t

    def settle(self) -> None:
        for stage, begin, end in self._events:
            self.seconds[stage] += begin.elapsed_time(end) / 1000
        self._events.clear()


class _HostShard:
    """One view of one shard in host memory, in its stored dtypes, filled batch by batch.

    On CUDA the buffers are pinned and each batch travels by non-blocking copies on the side stream
    ``copies`` while the next batch computes; ``settle`` waits for all but the newest one (on the CPU,
    where copies are done when made, for all). Rows not computed (images that failed to decode) are zeros."""

    def __init__(self, dense_shape, dense_dtype, summary_shape, summary_dtype, good: list[int], copies, stages):
        self.copies, self.stages, self.pending = copies, stages, []
        pin = copies is not None
        self.lag = int(pin)
        self.dense = torch.empty(dense_shape, dtype=dense_dtype, pin_memory=pin)  # every good row is overwritten
        self.dense[sorted(set(range(dense_shape[0])) - set(good))] = 0
        self.summary = torch.zeros(summary_shape, dtype=summary_dtype, pin_memory=pin)
        self.finite = torch.ones(dense_shape[0], dtype=torch.bool, pin_memory=pin)
        self.box = np.zeros((dense_shape[0], 4), np.float32)

    def put(self, rows: list[int], dense: torch.Tensor, summary: torch.Tensor, finite: torch.Tensor,
            boxes: torch.Tensor) -> None:
        self.box[rows] = boxes.numpy()
        lo, hi = rows[0], rows[-1] + 1
        whole = (self.dense, self.summary, self.finite)
        if hi - lo == len(rows):  # straight into place
            targets, scatter = tuple(x[lo:hi] for x in whole), None
        else:  # rows with gaps (failed images between them): staged, then scattered on the host
            targets = tuple(torch.empty(x.shape, dtype=x.dtype, pin_memory=self.copies is not None)
                            for x in (dense, summary, finite))
            scatter = torch.as_tensor(rows)
        self.pending.append((len(rows), self._copy(targets, (dense, summary, finite)), scatter, targets))

    def _copy(self, targets: tuple, sources: tuple):
        if self.copies is None:
            with self.stages.time("d2h"):
                for t, s in zip(targets, sources):
                    t.copy_(s)
            return None
        self.copies.wait_stream(torch.cuda.current_stream(self.copies.device))  # after the encode
        with torch.cuda.stream(self.copies), self.stages.time("d2h", self.copies):
            for t, s in zip(targets, sources):
                t.copy_(s, non_blocking=True)
                s.record_stream(self.copies)  # its memory is not reused before the copy is done
        return self.copies.record_event()

    def settle(self, final: bool = False) -> int:
        """Wait for the copies of the batches before the newest (``final``: of all of them);
        returns how many images they hold."""
        done = 0
        while len(self.pending) > (0 if final else self.lag):
            n, event, scatter, staged = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            if scatter is not None:
                for whole, part in zip((self.dense, self.summary, self.finite), staged):
                    whole[scatter] = part
            done += n
        return done


def _device_dtype(stored) -> torch.dtype:
    """The dtype features are cast to on the device for an array stored as ``stored``: itself when it
    is a float type; float32 otherwise (the store refuses floats for integer arrays, and says so)."""
    dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(stored))).dtype
    return dtype if dtype.is_floating_point else torch.float32


@contextmanager
def _shard_errors(doing: str):
    """Storage refusing a shard's write, said as a job says it (which shard of which view, where),
    whichever part of the store noticed it (the shard writer names the object it was writing)."""
    try:
        with storage_errors(doing):
            yield
    except StorageError as e:
        again = storage_error(e.__cause__, doing) if isinstance(e.__cause__, OSError) else None
        if again is None:
            raise
        raise again from e.__cause__


def _finite_rows(dense: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """Per image row, on the features' device: True when its dense and summary features are all finite."""
    return torch.isfinite(dense).flatten(1).all(dim=1) & torch.isfinite(summary).all(dim=1)
