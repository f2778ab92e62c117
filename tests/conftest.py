"""Fixtures shared by all tests: cache roots on local disk and on a real S3 server."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.support.fixtures import s3_server  # noqa: F401  (session-scoped SeaweedFS server)

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
