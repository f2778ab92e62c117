"""pytest fixtures that run real SeaweedFS S3 servers (see :mod:`tests.support.seaweed`).

Import them into a conftest or test module::

    from tests.support.fixtures import private_s3_server, s3_server  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.seaweed import SeaweedServer


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One S3 server shared by the whole session; tests use their own buckets."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def private_s3_server(tmp_path: Path) -> Iterator[SeaweedServer]:
    """An S3 server for one test alone, free to be stopped or restarted."""
    with SeaweedServer(tmp_path / "seaweed") as server:
        yield server
