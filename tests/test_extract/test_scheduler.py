"""The extract scheduler without Ray: back-off, the stop policy, a lost worker, progress and worker
sizing, on the ThreadExecutor (the real WorkerHost and ShardWorker code on a tiny teacher, in this
process). A shard's faults are injected by an executor that makes that one call fail with a real
exception (a reset connection, a ValueError) or kills the worker holding it; the Ray executor
keeps the same contract in the Ray tests of this folder."""

from __future__ import annotations

import io
import json
import shutil
import time
from contextlib import nullcontext

import pytest

import featcache
from featcache.errors import ShardFailedError, UsageError
from featcache.extract import pools
from featcache.extract.config import from_dict
from featcache.extract.executor import Cluster, ThreadExecutor
from featcache.extract.job import Runtime, run
from featcache.extract.plan import prepare
from featcache.extract.scheduler import Sizing, backoff, size_workers, teacher_pools
from tests.support.images import photo

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


class FaultyExecutor(ThreadExecutor):
    """Threads, and for each shard in ``faults`` its next ``process`` calls fail: an exception
    instance is raised inside the call, ``"kill"`` kills the worker that holds it."""

    def __init__(self, faults: dict[int, list], resources: dict | None = None):
        super().__init__(resources)
        self.faults = {shard: list(todo) for shard, todo in faults.items()}
        self.calls: list[int] = []
        self.times: dict[int, list[float]] = {}  # shard -> when each process call was made

    def call(self, worker, method: str, *args):
        if method != "process":
            return super().call(worker, method, *args)
        shard = args[0]
        self.calls.append(shard)
        self.times.setdefault(shard, []).append(time.monotonic())
        fault = self.faults.get(shard, [None]).pop(0) if self.faults.get(shard) else None
        if isinstance(fault, BaseException):
            return self._pool.submit(_raise, fault)
        future = super().call(worker, method, *args)
        if fault == "kill":
            self.kill(worker)
        return future


def _raise(error: BaseException):
    raise error


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scheduler_photos")
    for name in PHOTOS:
        shutil.copyfile(photo(name), folder / photo(name).name)
    return folder


def _config(tmp_path, source, job_teachers, **overrides):
    d = {"source": str(source), "output": str(tmp_path / "cache"), "shard_size": 1, "batch_size": 2,
         "stats": False, "progress_interval": 0.0, "cpu_workers": 1, "threads_per_worker": 1,
         "teachers": [{"family": "dinov3", "source": job_teachers["dinov3"], "codec": "f32"}]}
    return from_dict({**d, **overrides}, "test job")


def _run(config, executor):
    log = io.StringIO()
    runtime = Runtime(lambda: nullcontext(executor), lambda *args: [], "threads")
    return run(config, runtime, log), log.getvalue()


def test_a_transient_failure_is_retried_after_a_back_off(tmp_path, source, job_teachers):
    executor = FaultyExecutor({2: [ConnectionResetError("peer reset")]})
    result, log = _run(_config(tmp_path, source, job_teachers), executor)
    assert result.exit_code == 0 and result.processed == 4 and not result.failed_shards
    assert "shard 2: attempt 1 failed (ConnectionResetError: peer reset); retrying" in log
    assert sorted(executor.calls) == [0, 1, 2, 2, 3]
    first, second = executor.times[2]
    assert second - first >= 1.0  # the first back-off: 1 s
    assert featcache.verify(str(tmp_path / "cache")).ok


def test_back_off_doubles_up_to_fifteen_seconds():
    assert [backoff(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_a_shard_that_keeps_failing_is_given_up_after_max_retries(tmp_path, source, job_teachers):
    executor = FaultyExecutor({1: [ConnectionResetError("reset")] * 5})
    result, log = _run(_config(tmp_path, source, job_teachers, max_retries=1), executor)
    assert result.failed_shards == {1: "ConnectionResetError: reset"} and result.exit_code == 1
    assert executor.calls.count(1) == 2 and result.processed == 3  # one retry, then given up
    assert "shard 1 failed after 2 attempts: ConnectionResetError: reset" in log
    record = json.loads(open(result.record).read())
    assert record["shards"]["failed"] == {"1": "ConnectionResetError: reset"}


def test_any_other_error_stops_the_job_with_one_line(tmp_path, source, job_teachers):
    executor = FaultyExecutor({0: [ValueError("a bug")]})
    with pytest.raises(ShardFailedError) as e:
        _run(_config(tmp_path, source, job_teachers), executor)
    assert str(e.value).startswith("shard 0 of dinov3@64 failed: ValueError: a bug (not retried; traceback in ")
    record = json.loads(open(str(e.value).split("traceback in ")[1].split(")")[0]).read())
    assert record["stopped"]["not_started"] == [1, 2, 3] and record["exit_code"] == 1
    assert "ValueError: a bug" in record["stopped"]["traceback"]
    assert executor.calls == [0]


def test_a_lost_worker_is_replaced_and_its_shard_retried_at_once(tmp_path, source, job_teachers):
    executor = FaultyExecutor({1: ["kill"]})
    result, log = _run(_config(tmp_path, source, job_teachers), executor)
    assert result.exit_code == 0 and result.processed == 4
    assert "shard 1: attempt 1 failed (worker died: RuntimeError: the worker was killed); retrying" in log
    assert executor.calls.count(1) == 2 and len(result.record) and featcache.verify(str(tmp_path / "cache")).ok
    first, second = executor.times[1]
    assert second - first < 1.0  # no back-off: another worker takes it as soon as one is started


def test_progress_counts_every_image_once(tmp_path, source, job_teachers):
    result, log = _run(_config(tmp_path, source, job_teachers, shard_size=2), ThreadExecutor())
    done = [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("progress: ")]
    assert done == sorted(done) and done[-1] == 4, log
    assert log.splitlines()[-1].startswith("progress: 4/4 images (100%)") and result.images == 4


def _cluster(nodes: list[dict]) -> Cluster:
    return Cluster({k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}, nodes)


@pytest.mark.parametrize("overrides, nodes, shards, want", [
    ({}, [{"CPU": 8}, {"CPU": 6}], 10, Sizing("cpu", 2, 6, 0.0)),  # one worker per node, the smallest node's CPUs
    ({"cpu_workers": 4}, [{"CPU": 16}], 10, Sizing("cpu", 4, 4, 0.0)),  # a share of the cluster each
    ({"cpu_workers": 4}, [{"CPU": 16}], 3, Sizing("cpu", 3, 4, 0.0)),  # never more workers than shards
    ({"workers_per_gpu": 2}, [{"CPU": 16, "GPU": 2}], 10, Sizing("cuda", 4, 2, 0.5)),
    ({"device": "cpu"}, [{"CPU": 4, "GPU": 1}], 10, Sizing("cpu", 1, 4, 0.0)),
])
def test_worker_sizing(tmp_path, overrides, nodes, shards, want):
    config = from_dict({"output": str(tmp_path), **overrides}, "test job")
    got = size_workers(config, _cluster(nodes), shards)
    assert got == want
    assert got.need == ({"CPU": want.threads, "GPU": 0.0} if want.device == "cpu" else {"CPU": 1, "GPU": 0.5})


def test_cuda_without_gpus_is_refused(tmp_path):
    config = from_dict({"output": str(tmp_path), "device": "cuda"}, "test job")
    with pytest.raises(UsageError, match="device 'cuda' was asked for, but the Ray cluster has no GPUs"):
        size_workers(config, _cluster([{"CPU": 4}]), 4)


def test_workers_the_cluster_cannot_place_are_refused_before_any_starts(tmp_path, source, job_teachers):
    executor = FaultyExecutor({}, resources={"CPU": 2})
    with pytest.raises(UsageError, match="cannot place 2 workers of 2 CPU each: its 1 node .* can hold 1"):
        _run(_config(tmp_path, source, job_teachers, cpu_workers=2, threads_per_worker=2), executor)
    assert executor.calls == []


class _Gpu(ThreadExecutor):
    """One node with a GPU of ``memory`` bytes (what the probe of a real cluster asks torch)."""

    def __init__(self, memory: int):
        super().__init__({"CPU": 4, "GPU": 1})
        self.memory = memory

    def gpu_memory(self) -> int:
        return self.memory


def test_teachers_that_do_not_fit_one_gpu_together_run_as_pools(tmp_path, source, job_teachers):
    config = _config(tmp_path, source, job_teachers, device="cuda", teachers=[
        {"family": "siglip2", "source": job_teachers["siglip2"]},
        {"family": "dinov3", "source": job_teachers["dinov3"]}])
    plan = prepare(config)
    from featcache.extract.scheduler import footprint

    feet = [footprint(plan, i) for i in range(2)]
    room = lambda total: int((total + pools.CONTEXT_BYTES) / pools.FIT) + 1  # noqa: E731  memory this fits
    log = io.StringIO()
    assert teacher_pools(plan, _Gpu(room(sum(f.total for f in feet))), log) == [[0, 1]]
    assert teacher_pools(plan, _Gpu(room(max(f.total for f in feet))), log) == [[0], [1]]
    assert "2 teacher pools, run in turn on workers of" in log.getvalue()
