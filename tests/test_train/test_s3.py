"""Training from a cache on S3 refuses an unusable location as extract does: one line naming the
URL, exit 2, before any run folder exists (the preflight of ``featcache.store.location.check_reachable``)."""

from __future__ import annotations

import pytest

from featcache.errors import StorageError

from tests.support.seaweed import SeaweedServer
from tests.test_s3_preflight import assert_one_line, closed_endpoint, run_cli  # noqa: F401  (a fixture)

pytestmark = pytest.mark.s3


def _train(root: str, run) -> list[str]:
    return ["train", root, "--out", str(run), "--set", 'teachers=[{name="d", low="dinov3@64"}]']


def test_an_unreachable_endpoint(closed_endpoint, tmp_path, capsys):  # noqa: F811
    result = run_cli(_train("s3://b/cache", tmp_path / "run"), capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for s3://b/cache")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable, value", [("AWS_SECRET_ACCESS_KEY", "wrong-secret"),
                                             ("AWS_ACCESS_KEY_ID", "nobody")])
def test_refused_credentials(variable, value, s3_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(variable, value)
    result = run_cli(_train(s3_root, tmp_path / "run"), capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {s3_root}")
    assert not (tmp_path / "run").exists()


def test_missing_credentials(s3_root, monkeypatch, tmp_path, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = run_cli(_train(s3_root, tmp_path / "run"), capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {s3_root}")


def _s3_trainer(root: str, tmp_path, built, server):
    """A 3-step trainer on a copy at ``root`` of the training cache ``built`` (on local disk, once per session)."""
    from featcache.train import config
    from featcache.train.loop import Trainer

    server.filesystem().put(f"{built}/", root.removeprefix("s3://"), recursive=True)
    cfg = config.load(None, cache=root, overrides=[
        'teachers=[{name="dinov3", low="dinov3@64"}]', 'student.size="micro"', "resolution.low=[64]",
        "optim.steps=3", "optim.batch_size=4", "optim.warmup=1", "data.heldout=0.0", "eval.pictures=false"])
    return Trainer(cfg, tmp_path / "run")


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One S3 server for this module's tests that stop and start it (one start-up for them all)."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def own_server(module_server, monkeypatch):
    """A server this test alone stops and starts (the module's, running again if a test left it stopped), with
    the environment pointing at it."""
    if not module_server.running:
        module_server.start()
    for name, value in module_server.env().items():
        monkeypatch.setenv(name, value)
    module_server.make_bucket("train")
    return module_server


def test_the_server_stopping_mid_run_is_retried(own_server, training_cache, tmp_path, caplog, capfd, monkeypatch):
    """SeaweedFS stops after the trainer opened the cache and starts again only once the trainer said that a
    read failed and will be retried: the reads are retried with extract's back-off and the run finishes when
    the server is back. Six tries here (1 + 2 + 4 + 8 + 15 s of back-off) leave room for a slow restart."""
    from featcache.log import LOGGER
    from featcache.train import data

    monkeypatch.setattr(data, "MAX_READ_ATTEMPTS", 6)
    # s3fs's own retries (5, with back-off) absorbed the whole outage once on a busy machine, and the
    # trainer never saw it: one s3fs try and one botocore attempt here, so the trainer's retries are what
    # bridge the gap (and the outage can be short).
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="featcache")
    trainer = _s3_trainer("s3://train/cache", tmp_path, training_cache, own_server)
    trainer.out.mkdir()
    own_server.stop()
    said_retrying = threading.Event()

    class _Retrying(logging.Handler):  # the trainer's own line, in whichever thread it reads
        def emit(self, record):
            if "retrying" in record.getMessage():
                said_retrying.set()

    def back_after_a_retry():
        said_retrying.wait(120)
        own_server.start()

    handler = _Retrying()
    LOGGER.addHandler(handler)
    back = threading.Thread(target=back_after_a_retry)
    back.start()
    try:
        result = trainer.run()
    finally:
        said_retrying.set()
        back.join()
        LOGGER.removeHandler(handler)
    err = caplog.text + capfd.readouterr().err  # featcache's log (on stderr once a CLI call set it up)
    assert result.steps == 3 and "attempt 1 failed" in err and "retrying" in err, err


def test_a_server_that_stays_down_ends_the_run_in_one_line(own_server, training_cache, tmp_path, capfd, monkeypatch):
    from featcache.train import data

    monkeypatch.setattr(data, "MAX_READ_ATTEMPTS", 2)  # each try waits out s3fs's own retries: keep the test short
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # and botocore one try per call, not its back-off of seconds
    trainer = _s3_trainer("s3://train/cache", tmp_path, training_cache, own_server)
    trainer.out.mkdir()
    own_server.stop()
    with pytest.raises(StorageError, match=r"failed 2 times \(.*\); when the storage answers again, continue "
                                           r"with 'featcache train --out RUN --resume'") as e:
        trainer.run()
    assert "\n" not in str(e.value) and e.value.exit_code == 1
