"""Proof that the tests' shared Ray runtime (tests/support/ray_runtime.py) is there for the tests that ask
for it, is not for the others, is what a job's ``ray_session`` uses, and is not handed on busy."""

from __future__ import annotations

import io

import ray

from featcache.pipelines.ray_session import ray_session
from tests.support.ray_runtime import SHARED, order_for_one_runtime


def test_a_job_in_a_test_that_asks_runs_on_the_shared_runtime(ray_runtime):
    assert ray_runtime is SHARED and ray_runtime.up and ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == ray.available_resources()["CPU"] > 0
    said = io.StringIO()
    with ray_session(None, said):  # as a job opens it: the runtime that is up, nothing started
        assert ray.is_initialized()
    assert said.getvalue() == "" and ray.is_initialized()  # and not shut down after the job


def test_a_test_that_does_not_ask_sees_no_runtime():
    assert not SHARED.up and not ray.is_initialized()  # run after the test above: stopped for this one


def test_a_runtime_left_busy_is_stopped_not_handed_on(ray_runtime):
    @ray.remote(num_cpus=1)
    class Leaked:
        def pid(self) -> int:
            return 0

    leaked = Leaked.remote()
    ray.get(leaked.pid.remote())  # placed: it holds a CPU until it is killed
    ray_runtime.settle(wait_s=0.5)
    assert not ray_runtime.up and not ray.is_initialized()  # the next test that asks starts a fresh one


def test_the_modules_that_use_the_runtime_run_last_and_chained():
    class Item:
        def __init__(self, nodeid: str, asks: bool):
            self.nodeid, self.asks = nodeid, asks

    layout = {"a": "01", "b": "00", "c": "10", "d": "11", "e": "010", "f": "101", "g": "0"}
    items = [Item(f"{m}.py::t{i}", flag == "1") for m, flags in layout.items() for i, flag in enumerate(flags)]
    ordered = order_for_one_runtime(items, lambda item: item.asks)
    assert [i.nodeid.split(".")[0] for i in ordered] == list("bbgeeeaafffddcc")
    assert [i.nodeid for i in ordered if i.nodeid.startswith("f")] == ["f.py::t0", "f.py::t1", "f.py::t2"]
    flags = "".join("1" if i.asks else "0" for i in ordered)
    assert flags.count("01") + flags.startswith("1") == 3  # starts: e's, then a-f, f-d-c (6 in collection order)
