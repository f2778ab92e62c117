"""One saved tiny teacher per family, shared by the teacher tests."""

from __future__ import annotations

import pytest

from featcache.teachers import create_teacher, families
from tests.support.teachers import SAVERS


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """family -> (directory, the in-memory model that was saved there)."""
    return {f: SAVERS[f](tmp_path_factory.mktemp(f) / "model") for f in SAVERS}


@pytest.fixture(scope="session")
def teachers(saved):
    return {f: create_teacher(f, str(saved[f][0])) for f in families()}
