"""One embedded Ray runtime shared by the tests that only need *a* runtime, not their own.

Starting and stopping an embedded Ray costs about 5 s, and most extract and stats tests would pay it
once per job. A test (or a fixture it uses) that names the ``ray_runtime`` fixture runs its jobs on
one runtime started the way a job starts its own (``featcache.pipelines.ray_session``, which uses an
already-initialized runtime as it is). Every other test gets no runtime: it is stopped before such
a test is set up, so tests that need a fresh runtime, a private one, a killed process or none at all
see what they saw before. Ray's worker processes keep the environment of the moment the runtime
started: a test that sets variables its workers need (S3 credentials of a private server) must not
ask for the shared runtime. After each test the runtime must be idle again (every CPU free: a job
kills its actors when it ends); one that is not is stopped, and the next test that asks gets a
fresh one.
"""

from __future__ import annotations

import io
import time
from contextlib import ExitStack

#: How long the actors a job killed may take to give their CPUs back before the runtime counts as leaked.
IDLE_WAIT_S = 10.0


class SharedRay:
    """Starts the shared runtime on demand, stops it when a test must not see it."""

    def __init__(self):
        self._stack: ExitStack | None = None

    @property
    def up(self) -> bool:
        return self._stack is not None

    def start(self) -> None:
        """Start the runtime unless it is up: as a job would, quietly (its note goes nowhere)."""
        if self._stack is not None:
            return
        from featcache.pipelines.ray_session import ray_session

        stack = ExitStack()
        stack.enter_context(ray_session(None, io.StringIO()))
        self._stack = stack

    def stop(self) -> None:
        """Stop the runtime if this object started it."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def settle(self, wait_s: float = IDLE_WAIT_S) -> None:
        """After a test: keep the runtime only if every CPU is free again within ``wait_s`` (no actor a
        job left alive)."""
        if self._stack is None:
            return
        import ray

        if not ray.is_initialized():  # a test shut it down itself: close ours (SIGTERM's handler too)
            self.stop()
            return
        deadline = time.monotonic() + wait_s
        while not _idle(ray):
            if time.monotonic() > deadline:
                self.stop()
                return
            time.sleep(0.1)


def _idle(ray) -> bool:
    """Every CPU of the runtime is free."""
    return ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0)


SHARED = SharedRay()


def order_for_one_runtime(items: list, asks) -> list:
    """``items`` (pytest's, in collection order) with the modules that use the shared runtime moved
    after all the others, chained so that the runtime starts as few times as it can (each start and
    stop costs ~3.5 s, and the first job on a fresh runtime starts its workers again): modules that
    end asking for it come just before those that ask for it throughout, and those that begin asking
    for it just after. A module's own tests keep their order (its module-scoped fixtures are set up
    once); ``asks(item)`` says whether a test asks for the runtime."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def rank(tests: list) -> int:
        flags = [asks(t) for t in tests]
        if not any(flags):
            return 0
        if all(flags):
            return 3
        return 4 if flags[0] and not flags[-1] else (2 if flags[-1] else 1)

    ordered = sorted(modules.values(), key=rank)  # stable: collection order within a rank
    return [item for tests in ordered for item in tests]
