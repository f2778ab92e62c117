"""``featcache extract`` as a Ray job: the driver plans, tracks and finalizes; actors do the shards.

    featcache extract job.yaml                       # embedded local Ray, sized to this machine
    featcache extract job.yaml --ray-address auto    # join a running cluster

Work unit = one shard. Each actor wraps a :class:`featcache.extract.worker.ShardWorker` (the same
code runs without Ray), loads its teachers once, and is handed one shard at a time together with
the shard it will get next, which it decodes while computing the current one. Only shard numbers
and small records cross the Ray object store, never images or features. Teachers that do not fit
one GPU together run as pools, one after the other (``featcache.extract.pools``).

Failures: only transient ones are retried (``featcache.retry``). An actor that dies (killed, out
of memory, node lost) is replaced and its shard retried on another actor; a transient exception
inside a shard (a lost connection, a timeout: e.g. the object store restarting) is retried after a
back-off; after ``max_retries`` further attempts the shard is recorded as failed and left
uncommitted, so the next run picks it up. Any other exception (a full or read-only disk, a
featcache error, anything unexpected) stops the job: no new shard starts, those in flight finish,
and it ends with one line; an unexpected error's traceback goes into the run record. Resume = run
the same command again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from featcache.errors import FeatcacheError, ShardFailedError, StorageError, UsageError
from featcache.extract import calibration, limits, pools
from featcache.extract.config import ExtractConfig
from featcache.extract.finalize import consolidate_if_changed, failed_images, job_errors, write_run_record
from featcache.extract.plan import Plan, prepare
from featcache.extract.progress import Progress, plural
from featcache.retry import describe, is_transient, storage_error, storage_errors
from featcache.log import LogStream
from featcache.pipelines.ray_session import ray_session, resolve_address


@dataclass
class ExtractResult:
    root: str
    views: list[str]
    shards: int
    skipped: int  # already committed when the job started
    processed: int
    failed_shards: dict[int, str] = field(default_factory=dict)
    images: int = 0
    failed_images: int = 0
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the whole job: Ray's start-up, teachers loading, statistics
    processing_seconds: float = 0.0  # shards only, as the progress bar times them
    images_per_second: float = 0.0  # images / processing_seconds: the bar's final rate
    record: str = ""
    damaged: list[str] = field(default_factory=list)  # commit markers that could not be read

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_images or self.failed_shards or self.damaged else 0


def run(config: ExtractConfig, stream=None) -> ExtractResult:
    """Run (or resume) the extract job ``config``; messages go to ``stream`` (stderr).

    An error inside a shard that retrying cannot fix (a full or read-only disk, a featcache error,
    anything unexpected) stops the job: no new shard starts, the shards in flight finish (each one
    commits whole or not at all), the run record is written, and a one-line error is raised: a
    StorageError, or a ShardFailedError (an unexpected error's traceback is in the run record).
    """
    stream = stream or LogStream()
    t0 = time.perf_counter()
    with storage_errors(f"creating the views in {config.output}"):
        plan = prepare(config)
    _announce(plan, stream)
    keys = [v.key for v in plan.views]
    outcome = Outcome()
    with ray_session(config.ray_address, stream) if plan.todo else contextlib.nullcontext():
        if plan.todo:
            outcome = _run_pools(plan, stream)
        if outcome.stopped is None:
            outcome.stats = _stats(config, keys, stream)  # on the same Ray runtime
    if outcome.stopped is not None:
        raise _stop(plan, outcome, time.perf_counter() - t0, stream)
    rows = job_errors(plan)  # reads only the markers that changed since errors.parquet was written
    consolidate_if_changed(plan)  # for xarray: the views, arrays and attrs as this job leaves them
    damaged = [f"{r['view']} {r['reason']}" for r in rows if r["stage"] == "commit"]
    n_failed, reasons = failed_images(plan.cache, [r for r in rows if r["stage"] != "commit"])
    seconds = time.perf_counter() - t0
    images = sum(r["images"] for r in outcome.records)
    result = ExtractResult(
        root=plan.cache.root.uri, views=keys, shards=plan.num_shards, skipped=plan.done_shards,
        processed=len(outcome.records), failed_shards=outcome.failed, images=images, failed_images=n_failed,
        reasons=reasons, seconds=seconds, processing_seconds=outcome.seconds,
        images_per_second=images / outcome.seconds if outcome.seconds else 0.0, damaged=damaged)
    result.record = write_run_record(plan.cache, {**_record(plan, outcome, seconds, n_failed),
                                                  "exit_code": result.exit_code})
    return result


def _run_pools(plan: Plan, stream) -> "Outcome":
    """Each pool of teachers in turn (one pool unless they do not fit a GPU together), each on its
    own actors, released before the next pool starts; a stopped pool stops the job."""
    import ray

    groups = _teacher_pools(plan, ray, stream)
    outcome = Outcome()
    for n, group in enumerate(groups):
        if len(groups) > 1:
            names = " + ".join(plan.teachers[i].name for i in group)
            print(f"teacher pool {n + 1} of {len(groups)}: {names}", file=stream, flush=True)
        scheduler = Scheduler(plan, stream, group)
        if not scheduler.queue:
            continue
        outcome.add(scheduler.run())
        if outcome.stopped is not None:
            break
    outcome.pools = [[plan.teachers[i].name for i in g] for g in groups]
    return outcome


def _teacher_pools(plan: Plan, ray, stream) -> list[list[int]]:
    """The config's ``teacher_pools``; for ``auto`` on CUDA with several teachers, decided from their
    memory estimates and the memory of a worker's share of a GPU (asked of one GPU of the cluster)."""
    c = plan.config
    names = [t.name for t in plan.teachers]
    footprints = memory = None
    if c.teacher_pools == "auto" and len(names) > 1 and _device(c, ray) == "cuda":
        memory = _gpu_memory(ray) // c.workers_per_gpu
        footprints = [_footprint(plan, i) for i in range(len(names))]
    groups = pools.choose(c.teacher_pools, names, footprints, memory)
    if len(names) > 1:
        print(pools.describe(groups, names, footprints, memory), file=stream, flush=True)
    return groups


def _footprint(plan: Plan, i: int) -> pools.Footprint:
    """Teacher ``i``'s memory estimate: bf16 weights, a batch at its largest input."""
    import torch

    from featcache.teachers import teacher_parameters

    t, spec = plan.config.teachers[i], plan.teachers[i]
    tokens = limits.forward_tokens(spec, [v for v in plan.views if v.teacher == i])
    return pools.footprint(spec.name, teacher_parameters(t.family, t.source, t.revision), torch.bfloat16,
                           plan.config.batch_size, tokens, spec.channels)


def _gpu_memory(ray) -> int:
    """Bytes of memory of one of the cluster's GPUs (a task on it asks torch)."""

    @ray.remote(num_gpus=1)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(total_memory.remote())


def _device(config: ExtractConfig, ray) -> str:
    """The job's device: the config's, or for ``auto`` CUDA when the cluster has GPUs."""
    if config.device != "auto":
        return config.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) else "cpu"


def _announce(plan: Plan, stream) -> None:
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    say(plan.manifest_note)
    for line in plan.notes + plan.repaired:
        say(line)
    say(f"views: {', '.join(v.key for v in plan.views)}; {plural(plan.num_shards, 'shard')} of "
        f"{plural(plan.shard_size, 'image')}")
    if plan.done_shards:
        say(f"resuming: {plan.done_shards} of {plural(plan.num_shards, 'shard')} already committed in every view, "
            f"{len(plan.todo)} to do")


def _record(plan: Plan, outcome: "Outcome", seconds: float, failed_images: int) -> dict:
    """The run record's body (``runs/<time>-<pid>.json``): config, work done, timings, workers."""
    config, records = plan.config, outcome.records
    images = sum(r["images"] for r in records)
    return {
        "config": {**config.to_dict(), "ray_address": resolve_address(config.ray_address)[0]},
        "views": [v.key for v in plan.views],
        "teachers": [t.to_dict() for t in plan.teachers],
        "shards": {"total": plan.num_shards, "skipped": plan.done_shards, "processed": len(records),
                   "failed": {str(k): v for k, v in outcome.failed.items()}},
        "images": {"processed": images, "failed": failed_images},
        "seconds": {"wall": round(seconds, 3), "processing": round(outcome.seconds, 3),
                    "worker_busy": round(sum(r["seconds"]["total"] for r in records), 3)},
        "images_per_second": round(images / outcome.seconds if outcome.seconds else 0.0, 3),
        "workers": outcome.workers,
        "teacher_pools": outcome.pools,
        "shard_records": sorted(records, key=lambda r: r["shard"]),
        "stats": [dataclasses.asdict(r) for r in outcome.stats] if config.stats else "off"}


def _stop(plan: Plan, outcome: "Outcome", seconds: float, stream) -> FeatcacheError:
    """Write what a stopped job leaves (run record, errors table of the committed shards) as far as
    the storage lets us, and return the one-line error to raise."""
    stopped = outcome.stopped
    body = {**_record(plan, outcome, seconds, 0), "stopped": stopped.to_dict(), "exit_code": 1}
    del body["images"]["failed"]  # counted by the next run, which rebuilds the errors table anyway
    record, note = "", ""
    try:
        record = write_run_record(plan.cache, body)
        job_errors(plan)
    except StorageError as e:
        note = f"; {'errors.parquet' if record else 'the run record'} could not be written either ({e})"
    if not record and stopped.unexpected:
        print(stopped.traceback, file=stream, flush=True)  # the only copy of an unexpected error's traceback
    return _stop_error(stopped, record, note)


def _stop_error(stopped: "Stopped", record: str, note: str) -> FeatcacheError:
    """The one line a stopped job ends with (exit code 1: the job ran, and stopped)."""
    where = f"shard {stopped.shard} of {', '.join(stopped.views)}"
    storage = storage_error(stopped.error, f"writing {where}")
    if storage is not None:
        return StorageError(f"{storage} (committed shards are kept){note}", storage.errno)
    if stopped.unexpected:
        told = f"traceback in {record}" if record else "traceback above"
        error = ShardFailedError(f"{where} failed: {describe(stopped.error)} (not retried; {told}){note}")
    else:
        error = ShardFailedError(f"{where} failed: {stopped.error} (not retried){note}")
    error.__cause__ = stopped.error  # for Python callers
    return error


def _stats(config: ExtractConfig, keys: list[str], stream) -> list:
    """PHI-S and dispersion of the job's fully committed views (frozen ones are kept unless ``recompute_stats``)."""
    if not config.stats:
        return []
    from featcache.pipelines import stats

    rows = stats.run(config.output, keys, seed=config.seed, recompute=config.recompute_stats,
                     ray_address=config.ray_address, complete_only=True)
    print(stats.table(rows), file=stream, flush=True)
    return rows


# ---- Ray ------------------------------------------------------------------------------------


def _actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)  # progress() answers while process() runs
    class ExtractActor:
        """One worker: a ShardWorker in its own process, teachers loaded once."""

        def __init__(self, kwargs: dict, threads: int):
            import torch

            from featcache.extract.worker import ShardWorker

            torch.set_num_threads(threads)
            ctx = ray.get_runtime_context()
            info = {"node": ctx.get_node_id(), "host": socket.gethostname()}
            os.environ["FEATCACHE_NODE_ID"] = info["node"]
            self.identity = {**info, "pid": os.getpid(), "threads": threads}
            self.worker = None
            try:
                self.worker = ShardWorker(**kwargs, info=info)
            except FeatcacheError as e:  # a user's problem (e.g. weights that do not load): say it, stop the job
                self.identity["error"] = str(e)
            else:
                self.identity["device"] = str(self.worker.device)

        def ready(self) -> dict:
            return self.identity

        def process(self, shard: int, views: list[str], prefetch: int | None) -> dict:
            if self.worker is None:
                raise FeatcacheError(self.identity["error"])
            return self.worker.process(shard, views, prefetch)

        def calibrate(self, key: str, rows: list[int], seed: int) -> dict:
            return self.worker.calibrate(key, rows, seed)

        def progress(self) -> dict:
            return self.worker.progress() if self.worker is not None else {"shard": None, "images": 0}

    return ExtractActor


@dataclass
class Stopped:
    """What stopped a job: the shard, its views, the exception raised inside it, its traceback."""

    shard: int
    views: list[str]
    error: BaseException
    traceback: str
    not_started: list[int] = field(default_factory=list)

    @property
    def unexpected(self) -> bool:
        """Neither a featcache error nor storage refusing a write: a bug, or a case nobody foresaw."""
        return not isinstance(self.error, FeatcacheError) and storage_error(self.error, "") is None

    def to_dict(self) -> dict:
        return {"shard": self.shard, "views": self.views, "error": describe(self.error),
                "traceback": self.traceback, "not_started": self.not_started}


@dataclass
class Outcome:
    """What the workers did: a record per processed shard, the failed shards and why, the workers,
    the statistics, and what stopped the job (None when nothing did)."""

    records: list[dict] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    workers: dict[str, dict] = field(default_factory=dict)
    stats: list = field(default_factory=list)
    stopped: Stopped | None = None
    seconds: float = 0.0  # from the first shard submitted to the last one collected: what the progress bar times
    pools: list[list[str]] = field(default_factory=list)  # the teachers of each pool, run in this order

    def add(self, other: "Outcome") -> None:
        """Take in what the next pool's workers did."""
        self.records += other.records
        self.failed.update(other.failed)
        self.workers.update(other.workers)
        self.seconds += other.seconds
        self.stopped = other.stopped


@dataclass
class _Slot:
    actor: object
    shard: int | None = None
    ref: object = None
    reserved: int | None = None
    identity: dict | None = None


class Scheduler:
    """Hands shards to actors, retries transient failures, stops at any other, shows progress."""

    def __init__(self, plan: Plan, stream, pool: list[int] | None = None):
        import ray

        self.ray, self.plan, self.config = ray, plan, plan.config
        self.stream = stream
        pool = list(range(len(plan.teachers))) if pool is None else pool
        views = [dataclasses.replace(v, teacher=pool.index(v.teacher)) for v in plan.views if v.teacher in pool]
        keys = {v.key for v in views}
        self.todo = {shard: mine for shard, todo in plan.todo.items() if (mine := [k for k in todo if k in keys])}
        self.queue = deque(sorted(self.todo))
        self.attempts: dict[int, int] = {}
        self.not_before: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.records: list[dict] = []
        self.worker_summary: dict[str, dict] = {}
        self.slots: list[_Slot] = []
        self.stopped: Stopped | None = None
        self.device, self.n_workers, self.threads, self.gpus = self._sizing()
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        limits.check_placement(self.n_workers, self._resources(), alive)  # Ray would wait for them forever
        self.replacements = self.n_workers * (self.config.max_retries + 1)
        self.kwargs = dict(root=plan.cache.root.uri, teachers=[plan.teachers[i].to_dict() for i in pool],
                           views=[v.to_dict() for v in views], device=self.device, compile=self.config.compile,
                           batch_size=self.config.batch_size, view_policy=self.config.view_policy,
                           decode_threads=self.config.decode_threads, max_pixels=self.config.max_pixels)
        self.actor_cls = _actor_class()

    def _sizing(self) -> tuple[str, int, int, float]:
        c, ray = self.config, self.ray
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), int(resources.get("CPU", 1))
        device = _device(c, ray)
        if device == "cuda":
            if not gpus:
                raise UsageError("device 'cuda' was asked for, but the Ray cluster has no GPUs")
            n = int(gpus * c.workers_per_gpu)
            return device, max(1, min(n, len(self.queue))), c.threads_per_worker or 2, 1.0 / c.workers_per_gpu
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
        n = c.cpu_workers or max(1, len(nodes))
        per_node = min(int(x["Resources"]["CPU"]) for x in nodes) if nodes else cpus
        threads = c.threads_per_worker or max(1, (cpus // n) if c.cpu_workers else per_node)
        return device, max(1, min(n, len(self.queue))), threads, 0.0

    def _resources(self) -> dict[str, float]:
        """What one actor reserves: its torch threads' CPUs on the CPU, a CPU and its share of a GPU on CUDA."""
        return {"CPU": self.threads if self.device == "cpu" else 1, "GPU": self.gpus}

    def _spawn(self) -> _Slot:
        need = self._resources()
        options = {"num_cpus": need["CPU"], **({"num_gpus": need["GPU"]} if need["GPU"] else {})}
        return _Slot(self.actor_cls.options(**options).remote(self.kwargs, self.threads))

    def _start(self) -> list[_Slot]:
        """Start the actors and wait until each has loaded its teachers (saying so first: it can take
        minutes); a config error stops the job."""
        self._say(f"loading teachers on {plural(self.n_workers, 'worker')}…")
        slots = [self._spawn() for _ in range(self.n_workers)]
        for slot in slots:
            self._ready(slot)
        nodes = len({s.identity["node"] for s in slots})
        self._say(f"{plural(len(slots), 'worker')} ({self.device}, {plural(self.threads, 'torch thread')} each) "
                  f"on {plural(nodes, 'node')}")
        return slots

    def _ready(self, slot: _Slot) -> None:
        """Wait until ``slot``'s actor has loaded its teachers; a worker that cannot start stops the job."""
        try:
            slot.identity = self.ray.get(slot.actor.ready.remote())
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.OutOfMemoryError) as e:
            lines = [x for x in str(e).strip().splitlines() if x.strip()]
            if isinstance(e, self.ray.exceptions.OutOfMemoryError):  # Ray's memory monitor killed it
                lines = [lines[0]] if lines else []
            raise UsageError(f"a worker could not start: {lines[-1] if lines else type(e).__name__}") from None
        if "error" in slot.identity:
            raise FeatcacheError(slot.identity["error"])
        self.worker_summary[str(slot.identity["pid"])] = slot.identity

    def _say(self, text: str) -> None:
        """One log line on the job's stream, shown at once."""
        print(text, file=self.stream, flush=True)

    def _next_shard(self) -> int | None:
        now = time.monotonic()
        for _ in range(len(self.queue)):
            shard = self.queue.popleft()
            if self.not_before.get(shard, 0) <= now:
                return shard
            self.queue.append(shard)
        return None

    def _submit(self, slot: _Slot) -> None:
        if self.stopped is not None:  # no new shard once the job is stopping
            if slot.reserved is not None:
                self.queue.appendleft(slot.reserved)
            slot.reserved = None
            return
        shard = slot.reserved if slot.reserved is not None else self._next_shard()
        slot.reserved = None
        if shard is None:
            return
        slot.reserved = self._next_shard()
        slot.shard = shard
        slot.ref = slot.actor.process.remote(shard, self.todo[shard], slot.reserved)

    def _submit_idle(self) -> None:
        """Idle actors pick up their next shard (a shard waiting out a back-off once it is over)."""
        for slot in self.slots:
            if slot.ref is None:
                self._submit(slot)

    def run(self) -> Outcome:
        """Process the plan's shards; a non-transient error stops the job once the shards in flight end."""
        view = self.plan.cache.view(next(iter(self.todo.values()))[0])
        total = sum(stop - start for start, stop in map(view.shard_range, self.queue))
        self.slots = self._start()
        self._calibrate(self.slots)
        progress = Progress(total, self.stream, self.config.progress_interval)  # rate and ETA of the work,
        self._submit_idle()                                                      # not of Ray's start-up
        polls: dict = {}
        while any(s.ref is not None for s in self.slots) or (self.queue and self.stopped is None):
            busy = {s.ref: s for s in self.slots if s.ref is not None}
            if not busy:  # only shards waiting out a back-off
                time.sleep(0.2)
            else:
                done, _ = self.ray.wait(list(busy), num_returns=1, timeout=0.5)
                self._poll(polls, progress)
                for ref in done:
                    self._collect(busy[ref], progress)
                progress.tick()
            self._submit_idle()
        progress.close()
        self.seconds = progress.elapsed
        for slot in self.slots:  # the next pool's workers need this one's GPU memory
            self.ray.kill(slot.actor)
        if self.stopped is not None:
            self.stopped.not_started = sorted(self.queue)
        return Outcome(self.records, self.failed, self.worker_summary, stopped=self.stopped, seconds=self.seconds)

    def _poll(self, polls: dict, progress: Progress) -> None:
        """Per-batch progress: take the answers of the busy workers' ``progress()`` calls that
        arrived, then ask again those without a call pending (a dead worker's answer is dropped)."""
        if polls:
            ready, _ = self.ray.wait(list(polls), num_returns=len(polls), timeout=0)
            for ref in ready:
                polls.pop(ref)
                try:
                    answer = self.ray.get(ref)
                except self.ray.exceptions.RayError:
                    continue
                if answer["shard"] is not None and any(s.shard == answer["shard"] for s in self.slots):
                    progress.partial(answer["shard"], answer["images"])
        asked = set(polls.values())
        for slot in self.slots:
            if slot.ref is not None and id(slot) not in asked:
                polls[slot.actor.progress.remote()] = id(slot)

    def _collect(self, slot: _Slot, progress: Progress) -> None:
        """Take the result of ``slot``'s shard: its record, a retry, or the error that stops the job."""
        ray, shard, ref = self.ray, slot.shard, slot.ref
        slot.shard = slot.ref = None
        progress.forget(shard)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lost(slot, shard, e)
        except ray.exceptions.RayTaskError as e:
            self._failed(shard, e)
        else:
            self.records.append(record)
            progress.add(record["images"], record["failed"], shard)

    def _lost(self, slot: _Slot, shard: int, e: BaseException) -> None:
        """A dead worker (killed, out of memory, node lost) is transient: retry its shard elsewhere, replace it."""
        self.slots.remove(slot)
        self._retry(shard, f"worker died: {describe(e)}", delay=False)
        if slot.reserved is not None:
            self.queue.appendleft(slot.reserved)
        if self.stopped is not None:
            return
        if self.replacements > 0:
            self.replacements -= 1
            self.slots.append(self._spawn())
        elif not self.slots:
            self._give_up_all("no workers left")

    def _failed(self, shard: int, e: BaseException) -> None:
        """An exception inside a shard: retried after a back-off when transient; anything else stops the job."""
        cause = _cause(e) or e
        if is_transient(cause):
            self._retry(shard, describe(cause), delay=True)
            return
        self.failed[shard] = describe(cause)
        if self.stopped is not None:
            return
        trace = _ANSI.sub("", str(e))  # Ray's text of a task error: the remote traceback
        self.stopped = Stopped(shard, self.todo[shard], cause, trace)
        in_flight = sum(s.ref is not None for s in self.slots)
        if in_flight:
            self._say(f"stopping: shard {shard} failed ({describe(cause)}); waiting for "
                      f"{plural(in_flight, 'shard')} in flight")

    def _calibrate(self, slots: list[_Slot]) -> None:
        """Fit each pending int8-phis view's statistics and scale on one actor each (in parallel),
        and store them before any of its shards is written. A failure stops the job."""
        keys, rows = calibration.todo(self.plan)
        keys = [k for k in keys if any(k in todo for todo in self.todo.values())]  # this pool's views
        if not keys:
            return
        say = self._say
        say(f"calibrating int8-phis for {', '.join(keys)} on {plural(len(rows), 'image')}")
        refs = {key: slots[i % len(slots)].actor.calibrate.remote(key, rows, self.config.seed)
                for i, key in enumerate(keys)}
        for key, ref in refs.items():
            try:
                result = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as e:
                raise FeatcacheError(f"calibration of {key} failed: {describe(_cause(e) or e)}") from None
            view = self.plan.cache.view(key)
            with storage_errors(f"storing the calibration of {key} in {view.loc.uri}"):
                digest, stored = calibration.store_calibration(view, result)
            if not stored:
                say(f"{key}: another job stored its calibration first ({digest[:15]}); keeping that one")
                continue
            q = result["quantization"]
            say(f"{key}: scale {q['scale']:.4g}, knee {q['knee']}, relative MSE {q['relative_mse']:.2e} in PHI-S space on "
                f"{plural(q['calibration']['scale_tokens'], 'token')}, statistics {digest[:15]}")

    def _retry(self, shard: int, reason: str, delay: bool) -> None:
        n = self.attempts[shard] = self.attempts.get(shard, 0) + 1
        if n > self.config.max_retries or self.stopped is not None:
            self.failed[shard] = reason
            self._say(f"shard {shard} failed after {plural(n, 'attempt')}: {reason}")
            return
        self._say(f"shard {shard}: attempt {n} failed ({reason}); retrying")
        if delay:
            self.not_before[shard] = time.monotonic() + min(15.0, 2.0 ** (n - 1))
        self.queue.append(shard)

    def _give_up_all(self, reason: str) -> None:
        while self.queue:
            self.failed[self.queue.popleft()] = reason


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the process title in a task error's text


def _cause(e: BaseException) -> BaseException | None:
    """The exception raised inside the actor, when Ray kept it."""
    for name in ("cause", "cause_cls"):
        value = getattr(e, name, None)
        if isinstance(value, BaseException):
            return value
    return None
