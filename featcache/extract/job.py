"""An extract job from start to end: plan, schedule the shards on an executor's workers, the
statistics, the errors table and the run record; or, when a shard fails for good, the one line the
job stops with. The executor and the statistics job come from the caller (``pipelines/extract.py``
gives Ray's), so this runs the same under Ray and in tests without it.

An error inside a shard that retrying cannot fix (a full or read-only disk, a featcache error,
anything unexpected) stops the job: no new shard starts, those in flight finish (each commits whole
or not at all), the run record is written, and a one-line error is raised; an unexpected error's
traceback goes into the run record. Resume = run the same command again.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

from featcache.errors import FeatcacheError, ShardFailedError, StorageError
from featcache.extract.config import ExtractConfig
from featcache.extract.executor import Executor
from featcache.extract.finalize import consolidate_if_changed, failed_images, job_errors, write_run_record
from featcache.extract.plan import Plan, prepare
from featcache.extract.progress import plural
from featcache.extract.scheduler import Outcome, Stopped, run_pools
from featcache.log import LogStream
from featcache.retry import describe, storage_error, storage_errors
from featcache.store.zarrio import writes_settled_on_error


@dataclass(frozen=True)
class Runtime:
    """Where a job's workers run: ``connect()`` opens the executor (only when there is work);
    ``stats(config, keys, stream)`` runs the statistics job on the same runtime and returns its rows;
    ``address``: what the run record names as the cluster."""

    connect: Callable[[], AbstractContextManager[Executor]]
    stats: Callable[[ExtractConfig, list[str], object], list]
    address: str | None = None


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
    seconds: float = 0.0  # the whole job: the runtime's start-up, teachers loading, statistics
    processing_seconds: float = 0.0  # shards only, as the progress bar times them
    images_per_second: float = 0.0  # images / processing_seconds: the bar's final rate
    record: str = ""
    damaged: list[str] = field(default_factory=list)  # commit markers that could not be read

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_images or self.failed_shards or self.damaged else 0


def run(config: ExtractConfig, runtime: Runtime, stream=None) -> ExtractResult:
    """Run (or resume) the extract job ``config`` on ``runtime``; messages go to ``stream`` (stderr).

    A job stopped by a shard's error raises a StorageError or a ShardFailedError (one line)."""
    stream = stream or LogStream()
    t0 = time.perf_counter()
    with storage_errors(f"creating the views in {config.output}"), writes_settled_on_error():
        plan = prepare(config)
    announce(plan, stream)
    keys = [v.key for v in plan.views]
    outcome = Outcome()
    with runtime.connect() if plan.todo else nullcontext() as executor:
        if plan.todo:
            outcome = run_pools(plan, executor, stream)
        if outcome.stopped is None and config.stats:
            outcome.stats = runtime.stats(config, keys, stream)  # on the same runtime
    if outcome.stopped is not None:
        raise _stop(plan, outcome, runtime, time.perf_counter() - t0, stream)
    return _finish(plan, outcome, runtime, time.perf_counter() - t0)


def _finish(plan: Plan, outcome: Outcome, runtime: Runtime, seconds: float) -> ExtractResult:
    """The errors table, consolidated metadata and run record of a job that ran to its end."""
    rows = job_errors(plan)  # reads only the markers that changed since errors.parquet was written
    consolidate_if_changed(plan)  # for xarray: the views, arrays and attrs as this job leaves them
    damaged = [f"{r['view']} {r['reason']}" for r in rows if r["stage"] == "commit"]
    n_failed, reasons = failed_images(plan.cache, [r for r in rows if r["stage"] != "commit"])
    images = sum(r["images"] for r in outcome.records)
    result = ExtractResult(
        root=plan.cache.root.uri, views=[v.key for v in plan.views], shards=plan.num_shards,
        skipped=plan.done_shards, processed=len(outcome.records), failed_shards=outcome.failed, images=images,
        failed_images=n_failed, reasons=reasons, seconds=seconds, processing_seconds=outcome.seconds,
        images_per_second=images / outcome.seconds if outcome.seconds else 0.0, damaged=damaged)
    result.record = write_run_record(plan.cache, {**record(plan, outcome, runtime, seconds, n_failed),
                                                  "exit_code": result.exit_code})
    return result


def announce(plan: Plan, stream) -> None:
    """What the job found and will do: the manifest, notes, views, shards, what a resume skips."""
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    say(plan.manifest_note)
    for line in plan.notes + plan.repaired:
        say(line)
    say(f"views: {', '.join(v.key for v in plan.views)}; {plural(plan.num_shards, 'shard')} of "
        f"{plural(plan.shard_size, 'image')}")
    if plan.done_shards:
        say(f"resuming: {plan.done_shards} of {plural(plan.num_shards, 'shard')} already committed in every view, "
            f"{len(plan.todo)} to do")


def record(plan: Plan, outcome: Outcome, runtime: Runtime, seconds: float, failed_images: int) -> dict:
    """The run record's body (``runs/<time>-<pid>.json``): config, work done, timings, workers."""
    config, records = plan.config, outcome.records
    images = sum(r["images"] for r in records)
    return {
        "config": {**config.to_dict(), "ray_address": runtime.address},
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


def _stop(plan: Plan, outcome: Outcome, runtime: Runtime, seconds: float, stream) -> FeatcacheError:
    """Write what a stopped job leaves (run record, errors table of the committed shards) as far as
    the storage lets us, and return the one-line error to raise."""
    stopped = outcome.stopped
    body = {**record(plan, outcome, runtime, seconds, 0), "stopped": stopped.to_dict(), "exit_code": 1}
    del body["images"]["failed"]  # counted by the next run, which rebuilds the errors table anyway
    written, note = "", ""
    try:
        written = write_run_record(plan.cache, body)
        job_errors(plan)
    except StorageError as e:
        note = f"; {'errors.parquet' if written else 'the run record'} could not be written either ({e})"
    if not written and stopped.unexpected:
        print(stopped.traceback, file=stream, flush=True)  # the only copy of an unexpected error's traceback
    return stop_error(stopped, written, note)


def stop_error(stopped: Stopped, record: str, note: str) -> FeatcacheError:
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
