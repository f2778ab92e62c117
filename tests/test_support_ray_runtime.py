"""Proof that the tests' shared Ray runtime (tests/support/ray_runtime.py) is there for the tests that ask
for it, is not for the others, is what a job's ``ray_session`` uses, and is not handed on busy."""

from __future__ import annotations

import io

import ray

from featcache.pipelines.ray_session import ray_session
from tests.support.ray_runtime import SHARED


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
