"""Fixtures shared by all tests: cache roots on local disk and on a real S3 server."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.support.fixtures import s3_server  # noqa: F401  (session-scoped SeaweedFS server)
from tests.support.ray_runtime import SHARED, order_for_one_runtime

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    """Point s3fs at the test server through the environment, as a user would."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_root(s3_env) -> str:
    """A fresh s3:// prefix in its own bucket."""
    bucket = f"t{uuid.uuid4().hex[:16]}"
    s3_env.make_bucket(bucket)
    return f"s3://{bucket}/cache"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def cache_root(request, tmp_path) -> str:
    """The same test on a local directory and on S3."""
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory):
    """The cache tests/support/training.py builds (26 photos, three tiny teachers, statistics) on local
    disk, built once for the session: copy it before changing it."""
    from tests.support import training

    base = tmp_path_factory.mktemp("training_cache")
    training.build(base / "cache", training.photos(base / "photos"), training.teachers(base / "models"))
    return base / "cache"


@pytest.fixture(scope="session")
def ray_runtime():
    """One embedded Ray shared by the tests that name this fixture (directly or through theirs); jobs
    use it as it is. Tests that do not name it run with no runtime up (tests/support/ray_runtime.py)."""
    SHARED.start()
    return SHARED


def _asks_for_ray(item) -> bool:
    return "ray_runtime" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """The modules that use the shared runtime run last, one after another (fewer starts of it)."""
    items[:] = order_for_one_runtime(items, _asks_for_ray)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test: the shared runtime up for a test that asks for it, down for the rest."""
    if _asks_for_ray(item):
        SHARED.start()
    else:
        SHARED.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's fixtures are gone: a runtime a job left busy is stopped, not handed on."""
    yield
    SHARED.settle()


def pytest_sessionfinish(session, exitstatus):
    SHARED.stop()


#: No test may take longer (setup, call and teardown together): the suite's budget (issue 24).
TEST_BUDGET_S = 60.0
_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Name every test over the budget at the end of the run (a busy machine can push one over: a
    warning to read, not a failure)."""
    over = sorted(((s, n) for n, s in _seconds.items() if s > TEST_BUDGET_S), reverse=True)
    if over:
        terminalreporter.section(f"tests over the {TEST_BUDGET_S:.0f} s budget")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:7.1f}s  {nodeid}")
