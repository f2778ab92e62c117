"""The extract scheduler: hands shards to workers, retries transient failures, stops at any other.

Work unit = one shard. Each worker (an executor's :class:`~featcache.extract.executor.WorkerHost`)
loads its teachers once and is handed one shard at a time together with the shard it will get next,
which it decodes while computing the current one. Teachers that do not fit one GPU together run as
pools, one after the other (``featcache.extract.pools``), each on workers of its own.

Failures: only transient ones are retried (``featcache.retry``). A worker that dies (killed, out of
memory, node lost) is replaced and its shard retried on another worker; a transient exception inside
a shard (a lost connection, a timeout) is retried after a back-off (1, 2, 4 ... 15 s); after
``max_retries`` further attempts the shard is recorded as failed and left uncommitted, so the next
run picks it up. Any other exception stops the job: no new shard starts, those in flight finish.
The executor (Ray in ``pipelines/extract.py``, threads in :class:`~featcache.extract.executor.ThreadExecutor`)
is injected: nothing here knows which one runs the workers.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

from featcache.errors import FeatcacheError, UsageError
from featcache.extract import calibration, limits, pools
from featcache.extract.config import ExtractConfig
from featcache.extract.executor import Cluster, Executor, TaskFailed, WorkerLost
from featcache.extract.plan import Plan
from featcache.extract.progress import Progress, plural
from featcache.retry import describe, is_transient, storage_error, storage_errors
from featcache.store.zarrio import writes_settled_on_error

MAX_BACKOFF = 15.0  # seconds: the longest wait before a transient failure's retry
WAIT = 0.5  # seconds the loop waits for a shard to finish before it polls progress again


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


def run_pools(plan: Plan, executor: Executor, stream) -> Outcome:
    """Each pool of teachers in turn (one pool unless they do not fit a GPU together), each on its
    own workers, released before the next pool starts; a stopped pool stops the job."""
    groups = teacher_pools(plan, executor, stream)
    outcome = Outcome()
    for n, group in enumerate(groups):
        if len(groups) > 1:
            names = " + ".join(plan.teachers[i].name for i in group)
            print(f"teacher pool {n + 1} of {len(groups)}: {names}", file=stream, flush=True)
        scheduler = Scheduler(plan, executor, stream, group)
        if not scheduler.queue:
            continue
        outcome.add(scheduler.run())
        if outcome.stopped is not None:
            break
    outcome.pools = [[plan.teachers[i].name for i in g] for g in groups]
    return outcome


def teacher_pools(plan: Plan, executor: Executor, stream) -> list[list[int]]:
    """The config's ``teacher_pools``; for ``auto`` on CUDA with several teachers, decided from their
    memory estimates and the memory of a worker's share of a GPU (asked of one GPU of the cluster)."""
    c = plan.config
    names = [t.name for t in plan.teachers]
    footprints = memory = None
    if c.teacher_pools == "auto" and len(names) > 1 and device_of(c, executor.cluster()) == "cuda":
        memory = executor.gpu_memory() // c.workers_per_gpu
        footprints = [footprint(plan, i) for i in range(len(names))]
    groups = pools.choose(c.teacher_pools, names, footprints, memory)
    if len(names) > 1:
        print(pools.describe(groups, names, footprints, memory), file=stream, flush=True)
    return groups


def footprint(plan: Plan, i: int) -> pools.Footprint:
    """Teacher ``i``'s memory estimate: bf16 weights, the largest forward of its views (as their
    kinds run it: inputs x tokens)."""
    import torch

    from featcache.teachers import teacher_parameters

    t, spec = plan.config.teachers[i], plan.teachers[i]
    forwards = [v.kind.forward(spec, plan.config.batch_size) for v in plan.views if v.teacher == i]
    largest = max(forwards, key=lambda f: f.inputs * f.tokens(spec))
    return pools.footprint(spec.name, teacher_parameters(t.family, t.source, t.revision), torch.bfloat16,
                           largest.inputs, largest.tokens(spec), spec.channels)


def device_of(config: ExtractConfig, cluster: Cluster) -> str:
    """The job's device: the config's, or for ``auto`` CUDA when the cluster has GPUs."""
    if config.device != "auto":
        return config.device
    return "cuda" if cluster.totals.get("GPU", 0) else "cpu"


@dataclass(frozen=True)
class Sizing:
    """How many workers, on which device, with how many torch threads and which share of a GPU each."""

    device: str
    workers: int
    threads: int
    gpus: float

    @property
    def need(self) -> dict[str, float]:
        """What one worker reserves: its torch threads' CPUs on the CPU, a CPU and its share of a GPU on CUDA."""
        return {"CPU": self.threads if self.device == "cpu" else 1, "GPU": self.gpus}


def size_workers(config: ExtractConfig, cluster: Cluster, shards: int) -> Sizing:
    """Workers for ``shards`` shards: ``workers_per_gpu`` per GPU on CUDA; on the CPU ``cpu_workers``
    (default one per node), each with ``threads_per_worker`` threads (default its node's CPUs, or
    its share of the cluster's when ``cpu_workers`` is given). Never more workers than shards."""
    gpus, cpus = cluster.totals.get("GPU", 0), int(cluster.totals.get("CPU", 1))
    device = device_of(config, cluster)
    if device == "cuda":
        if not gpus:
            raise UsageError("device 'cuda' was asked for, but the Ray cluster has no GPUs")
        n = int(gpus * config.workers_per_gpu)
        return Sizing(device, max(1, min(n, shards)), config.threads_per_worker or 2, 1.0 / config.workers_per_gpu)
    nodes = [n for n in cluster.nodes if n.get("CPU")]
    n = config.cpu_workers or max(1, len(nodes))
    per_node = min(int(x["CPU"]) for x in nodes) if nodes else cpus
    threads = config.threads_per_worker or max(1, (cpus // n) if config.cpu_workers else per_node)
    return Sizing(device, max(1, min(n, shards)), threads, 0.0)


@dataclass
class _Slot:
    worker: object
    shard: int | None = None
    future: object = None
    reserved: int | None = None
    identity: dict | None = None


class Scheduler:
    """Hands shards to workers, retries transient failures, stops at any other, shows progress."""

    def __init__(self, plan: Plan, executor: Executor, stream, pool: list[int] | None = None):
        self.executor, self.plan, self.config = executor, plan, plan.config
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
        self.seconds = 0.0
        cluster = executor.cluster()
        self.sizing = size_workers(self.config, cluster, len(self.queue))
        self.device, self.n_workers, self.threads = self.sizing.device, self.sizing.workers, self.sizing.threads
        limits.check_placement(self.n_workers, self.sizing.need, cluster.nodes)  # Ray would wait for them forever
        self.replacements = self.n_workers * (self.config.max_retries + 1)
        self.kwargs = dict(root=plan.cache.root.uri, teachers=[plan.teachers[i].to_dict() for i in pool],
                           views=[v.to_dict() for v in views], device=self.device, compile=self.config.compile,
                           batch_size=self.config.batch_size, view_policy=self.config.view_policy,
                           decode_threads=self.config.decode_threads, max_pixels=self.config.max_pixels)

    def _spawn(self) -> _Slot:
        return _Slot(self.executor.spawn(self.kwargs, self.threads, self.sizing.need))

    def _start(self) -> list[_Slot]:
        """Start the workers and wait until each has loaded its teachers (saying so first: it can take
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
        """Wait until ``slot``'s worker has loaded its teachers; a worker that cannot start stops the job."""
        try:
            slot.identity = self.executor.result(self.executor.call(slot.worker, "ready"))
        except WorkerLost as e:
            raise UsageError(f"a worker could not start: {e.summary}") from None
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
        slot.future = self.executor.call(slot.worker, "process", shard, self.todo[shard], slot.reserved)

    def _submit_idle(self) -> None:
        """Idle workers pick up their next shard (a shard waiting out a back-off once it is over)."""
        for slot in self.slots:
            if slot.future is None:
                self._submit(slot)

    def run(self) -> Outcome:
        """Process the plan's shards; a non-transient error stops the job once the shards in flight end."""
        view = self.plan.cache.view(next(iter(self.todo.values()))[0])
        total = sum(stop - start for start, stop in map(view.shard_range, self.queue))
        self.slots = self._start()
        self._calibrate(self.slots)
        progress = Progress(total, self.stream, self.config.progress_interval)  # rate and ETA of the work,
        self._submit_idle()                                                      # not of the start-up
        polls: dict = {}
        while any(s.future is not None for s in self.slots) or (self.queue and self.stopped is None):
            busy = {s.future: s for s in self.slots if s.future is not None}
            if not busy:  # only shards waiting out a back-off
                time.sleep(0.2)
            else:
                done = self.executor.first(list(busy), WAIT)
                self._poll(polls, progress)
                for future in done:
                    self._collect(busy[future], progress)
                progress.tick()
            self._submit_idle()
        progress.close()
        self.seconds = progress.elapsed
        for slot in self.slots:  # the next pool's workers need this one's GPU memory
            self.executor.kill(slot.worker)
        if self.stopped is not None:
            self.stopped.not_started = sorted(self.queue)
        return Outcome(self.records, self.failed, self.worker_summary, stopped=self.stopped, seconds=self.seconds)

    def _poll(self, polls: dict, progress: Progress) -> None:
        """Per-batch progress: take the answers of the busy workers' ``progress()`` calls that
        arrived, then ask again those without a call pending (a dead worker's answer is dropped)."""
        for future in self.executor.finished(list(polls)) if polls else []:
            polls.pop(future)
            try:
                answer = self.executor.result(future)
            except (WorkerLost, TaskFailed):
                continue
            if answer["shard"] is not None and any(s.shard == answer["shard"] for s in self.slots):
                progress.partial(answer["shard"], answer["images"])
        asked = set(polls.values())
        for slot in self.slots:
            if slot.future is not None and id(slot) not in asked:
                polls[self.executor.call(slot.worker, "progress")] = id(slot)

    def _collect(self, slot: _Slot, progress: Progress) -> None:
        """Take the result of ``slot``'s shard: its record, a retry, or the error that stops the job."""
        shard, future = slot.shard, slot.future
        slot.shard = slot.future = None
        progress.forget(shard)
        try:
            record = self.executor.result(future)
        except WorkerLost as e:
            self._lost(slot, shard, e)
        except TaskFailed as e:
            self._failed(shard, e)
        else:
            self.records.append(record)
            progress.add(record["images"], record["failed"], shard)

    def _lost(self, slot: _Slot, shard: int, e: WorkerLost) -> None:
        """A dead worker (killed, out of memory, node lost) is transient: retry its shard elsewhere, replace it."""
        self.slots.remove(slot)
        self._retry(shard, f"worker died: {describe(e.cause)}", delay=False)
        if slot.reserved is not None:
            self.queue.appendleft(slot.reserved)
        if self.stopped is not None:
            return
        if self.replacements > 0:
            self.replacements -= 1
            self.slots.append(self._spawn())
        elif not self.slots:
            self._give_up_all("no workers left")

    def _failed(self, shard: int, e: TaskFailed) -> None:
        """An exception inside a shard: retried after a back-off when transient; anything else stops the job."""
        cause = e.cause
        if is_transient(cause):
            self._retry(shard, describe(cause), delay=True)
            return
        self.failed[shard] = describe(cause)
        if self.stopped is not None:
            return
        self.stopped = Stopped(shard, self.todo[shard], cause, e.trace)
        in_flight = sum(s.future is not None for s in self.slots)
        if in_flight:
            self._say(f"stopping: shard {shard} failed ({describe(cause)}); waiting for "
                      f"{plural(in_flight, 'shard')} in flight")

    def _calibrate(self, slots: list[_Slot]) -> None:
        """Fit each pending int8-phis view's statistics and scale on one worker each (in parallel),
        and store them before any of its shards is written. A failure stops the job."""
        keys, rows = calibration.todo(self.plan)
        keys = [k for k in keys if any(k in todo for todo in self.todo.values())]  # this pool's views
        if not keys:
            return
        say = self._say
        say(f"calibrating int8-phis for {', '.join(keys)} on {plural(len(rows), 'image')}")
        futures = {key: self.executor.call(slots[i % len(slots)].worker, "calibrate", key, rows, self.config.seed)
                   for i, key in enumerate(keys)}
        for key, future in futures.items():
            try:
                result = self.executor.result(future)
            except (WorkerLost, TaskFailed) as e:
                raise FeatcacheError(f"calibration of {key} failed: {describe(e.cause)}") from None
            view = self.plan.cache.view(key)
            doing = f"storing the calibration of {key} in {view.loc.uri}"
            with storage_errors(doing), writes_settled_on_error():
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
            self.not_before[shard] = time.monotonic() + backoff(n)
        self.queue.append(shard)

    def _give_up_all(self, reason: str) -> None:
        while self.queue:
            self.failed[self.queue.popleft()] = reason


def backoff(attempt: int) -> float:
    """Seconds before the retry that follows failed attempt ``attempt`` (1, 2, 4, ... at most 15)."""
    return min(MAX_BACKOFF, 2.0 ** (attempt - 1))
