"""``featcache extract`` as a Ray job: the driver plans, tracks and finalizes; actors do the shards.

    featcache extract job.yaml                       # embedded local Ray, sized to this machine
    featcache extract job.yaml --ray-address auto    # join a running cluster

Work unit = one shard. Each actor wraps a :class:`featcache.extract.worker.ShardWorker` (the same
code runs without Ray), loads its teachers once, and is handed one shard at a time together with
the shard it will get next, which it decodes while computing the current one. Only shard numbers
and small records cross the Ray object store, never images or features.

Failures: an actor that dies (killed, out of memory, node lost) is replaced and its shard retried
on another actor; an exception inside a shard (e.g. the object store restarting) is retried after a
back-off; after ``max_retries`` further attempts the shard is recorded as failed and left
uncommitted, so the next run picks it up. Resume = run the same command again.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from featcache.errors import FeatcacheError, UsageError
from featcache.extract import calibration
from featcache.extract.config import ExtractConfig
from featcache.extract.finalize import failed_images, rebuild_errors, write_run_record
from featcache.extract.plan import Plan, prepare
from featcache.extract.progress import Progress
from pipelines.ray_session import ray_session


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
    seconds: float = 0.0
    images_per_second: float = 0.0
    record: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_images or self.failed_shards else 0


def run(config: ExtractConfig, stream=None) -> ExtractResult:
    """Run (or resume) the extract job ``config``; messages go to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    plan = prepare(config)
    say(plan.manifest_note)
    for line in plan.repaired:
        say(line)
    say(f"views: {', '.join(v.key for v in plan.views)}; {plan.num_shards} shards of {plan.shard_size} images")
    if plan.done_shards:
        say(f"resuming: {plan.done_shards} of {plan.num_shards} shards already committed in every view, "
            f"{len(plan.todo)} to do")
    records, failed_shards, workers = [], {}, {}
    keys = [v.key for v in plan.views]
    if plan.todo:
        with ray_session(config.ray_address):
            scheduler = Scheduler(plan, stream)
            records, failed_shards = scheduler.run()
            workers = scheduler.worker_summary
            stats_rows = _stats(config, keys, stream)  # on the same Ray runtime
    else:
        stats_rows = _stats(config, keys, stream)
    rows = rebuild_errors(plan.cache, keys)
    n_failed, reasons = failed_images(plan.cache, rows)
    seconds = time.perf_counter() - t0
    images = sum(r["images"] for r in records)
    compute = sum(r["seconds"]["total"] for r in records)
    result = ExtractResult(
        root=plan.cache.root.uri, views=keys, shards=plan.num_shards, skipped=plan.done_shards,
        processed=len(records), failed_shards=failed_shards, images=images, failed_images=n_failed,
        reasons=reasons, seconds=seconds, images_per_second=images / seconds if seconds else 0.0)
    result.record = write_run_record(plan.cache, {
        "config": config.to_dict(), "views": keys, "teachers": [t.to_dict() for t in plan.teachers],
        "shards": {"total": plan.num_shards, "skipped": plan.done_shards, "processed": len(records),
                   "failed": {str(k): v for k, v in failed_shards.items()}},
        "images": {"processed": images, "failed": n_failed},
        "seconds": {"wall": round(seconds, 3), "worker_busy": round(compute, 3)},
        "images_per_second": round(result.images_per_second, 3), "workers": workers,
        "shard_records": sorted(records, key=lambda r: r["shard"]),
        "stats": [dataclasses.asdict(r) for r in stats_rows] if config.stats else "off",
        "exit_code": result.exit_code})
    return result


def _stats(config: ExtractConfig, keys: list[str], stream) -> list:
    """PHI-S and dispersion of the job's fully committed views (frozen ones are kept)."""
    if not config.stats:
        return []
    from pipelines import stats

    rows = stats.run(config.output, keys, seed=config.seed, ray_address=config.ray_address, complete_only=True)
    print(stats.table(rows), file=stream, flush=True)
    return rows


# ---- Ray ------------------------------------------------------------------------------------


def _actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
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

    return ExtractActor


@dataclass
class _Slot:
    actor: object
    shard: int | None = None
    ref: object = None
    reserved: int | None = None
    identity: dict | None = None


class Scheduler:
    """Hands shards to actors, retries failures, shows progress."""

    def __init__(self, plan: Plan, stream):
        import ray

        self.ray, self.plan, self.config = ray, plan, plan.config
        self.stream = stream
        self.queue = deque(sorted(plan.todo))
        self.attempts: dict[int, int] = {}
        self.not_before: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.records: list[dict] = []
        self.worker_summary: dict[str, dict] = {}
        self.device, self.n_workers, self.threads, self.gpus = self._sizing()
        self.replacements = self.n_workers * (self.config.max_retries + 1)
        self.kwargs = dict(root=plan.cache.root.uri, teachers=[t.to_dict() for t in plan.teachers],
                           views=[v.to_dict() for v in plan.views], device=self.device,
                           batch_size=self.config.batch_size, view_policy=self.config.view_policy,
                           decode_threads=self.config.decode_threads, max_pixels=self.config.max_pixels)
        self.actor_cls = _actor_class()

    def _sizing(self) -> tuple[str, int, int, float]:
        c, ray = self.config, self.ray
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), int(resources.get("CPU", 1))
        device = c.device if c.device != "auto" else ("cuda" if gpus else "cpu")
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

    def _spawn(self) -> _Slot:
        options = {"num_cpus": self.threads if self.device == "cpu" else 1}
        if self.gpus:
            options["num_gpus"] = self.gpus
        return _Slot(self.actor_cls.options(**options).remote(self.kwargs, self.threads))

    def _start(self) -> list[_Slot]:
        """Start the actors and wait until each has loaded its teachers; a config error stops the job."""
        slots = [self._spawn() for _ in range(self.n_workers)]
        for slot in slots:
            try:
                slot.identity = self.ray.get(slot.actor.ready.remote())
            except self.ray.exceptions.RayActorError as e:
                lines = [x for x in str(e).strip().splitlines() if x.strip()]
                raise UsageError(f"a worker could not start: {lines[-1] if lines else type(e).__name__}") from None
            if "error" in slot.identity:
                raise FeatcacheError(slot.identity["error"])
            self.worker_summary[str(slot.identity["pid"])] = slot.identity
        ids = sorted({s.identity["node"][:8] for s in slots})
        print(f"{len(slots)} workers ({self.device}, {self.threads} torch threads each) on {len(ids)} node(s)",
              file=self.stream, flush=True)
        return slots

    def _next_shard(self) -> int | None:
        now = time.monotonic()
        for _ in range(len(self.queue)):
            shard = self.queue.popleft()
            if self.not_before.get(shard, 0) <= now:
                return shard
            self.queue.append(shard)
        return None

    def _submit(self, slot: _Slot) -> None:
        shard = slot.reserved if slot.reserved is not None else self._next_shard()
        slot.reserved = None
        if shard is None:
            slot.shard = slot.ref = None
            return
        slot.reserved = self._next_shard()
        slot.shard = shard
        slot.ref = slot.actor.process.remote(shard, self.plan.todo[shard], slot.reserved)

    def run(self) -> tuple[list[dict], dict[int, str]]:
        ray = self.ray
        view = self.plan.cache.view(self.plan.views[0].key)
        total = sum(stop - start for start, stop in map(view.shard_range, self.queue))
        progress = Progress(total, self.stream, self.config.progress_interval)
        slots = self._start()
        self._calibrate(slots)
        for slot in slots:
            self._submit(slot)
        while any(s.ref is not None for s in slots) or self.queue:
            busy = {s.ref: s for s in slots if s.ref is not None}
            if not busy:  # only shards waiting out a back-off
                time.sleep(0.2)
                for slot in slots:
                    self._submit(slot)
                continue
            done, _ = ray.wait(list(busy), num_returns=1, timeout=0.5)
            progress.tick()
            for ref in done:
                slot = busy[ref]
                shard = slot.shard
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    slots.remove(slot)
                    self._retry(shard, f"worker died: {_first_line(e)}", delay=False)
                    if slot.reserved is not None:
                        self.queue.appendleft(slot.reserved)
                    if self.replacements > 0:
                        self.replacements -= 1
                        slots.append(self._spawn())
                    elif not slots:
                        self._give_up_all("no workers left")
                    continue
                except ray.exceptions.RayTaskError as e:
                    self._retry(shard, _first_line(_cause(e) or e), delay=True)
                else:
                    self.records.append(record)
                    progress.add(record["images"], record["failed"])
                self._submit(slot)
            for slot in slots:  # idle actors pick up shards whose back-off is over
                if slot.ref is None:
                    self._submit(slot)
        progress.close()
        return self.records, self.failed

    def _calibrate(self, slots: list[_Slot]) -> None:
        """Fit each pending int8-phis view's statistics and scale on one actor each (in parallel),
        and store them before any of its shards is written. A failure stops the job."""
        keys, rows = calibration.todo(self.plan)
        if not keys:
            return
        say = lambda text: print(text, file=self.stream, flush=True)  # noqa: E731
        say(f"calibrating int8-phis for {', '.join(keys)} on {len(rows)} images")
        refs = {key: slots[i % len(slots)].actor.calibrate.remote(key, rows, self.config.seed)
                for i, key in enumerate(keys)}
        for key, ref in refs.items():
            try:
                result = self.ray.get(ref)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as e:
                raise FeatcacheError(f"calibration of {key} failed: {_first_line(_cause(e) or e)}") from None
            digest, stored = calibration.store_calibration(self.plan.cache.view(key), result)
            if not stored:
                say(f"{key}: another job stored its calibration first ({digest[:15]}); keeping that one")
                continue
            q = result["quantization"]
            say(f"{key}: scale {q['scale']:.4g}, knee {q['knee']}, relative MSE {q['relative_mse']:.2e} in PHI-S space on "
                f"{q['calibration']['scale_tokens']} tokens, statistics {digest[:15]}")

    def _retry(self, shard: int, reason: str, delay: bool) -> None:
        n = self.attempts[shard] = self.attempts.get(shard, 0) + 1
        if n > self.config.max_retries:
            self.failed[shard] = reason
            print(f"shard {shard} failed after {n} attempts: {reason}", file=self.stream, flush=True)
            return
        print(f"shard {shard}: attempt {n} failed ({reason}); retrying", file=self.stream, flush=True)
        if delay:
            self.not_before[shard] = time.monotonic() + min(15.0, 2.0 ** (n - 1))
        self.queue.append(shard)

    def _give_up_all(self, reason: str) -> None:
        while self.queue:
            self.failed[self.queue.popleft()] = reason


def _cause(e: BaseException) -> BaseException | None:
    """The exception raised inside the actor, when Ray kept it."""
    for name in ("cause", "cause_cls"):
        value = getattr(e, name, None)
        if isinstance(value, BaseException):
            return value
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
