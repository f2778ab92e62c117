"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def whole_run(training_cache, tmp_path_factory) -> Path:
    """test_loop's 12-step run (its CONFIG) on the session's training cache, uninterrupted, trained once: what
    the killed and resumed runs of test_loop, test_run_folder and test_s3_runs must log. Read it, never change it."""
    from featcache.train import config, train
    from tests.test_train.test_loop import CONFIG

    path = tmp_path_factory.mktemp("whole_run") / "train.toml"
    path.write_text(CONFIG)
    run = path.parent / "run"
    train(config.load(path, cache=str(training_cache)), run)
    return run
