"""An unusable S3 location is reported before any work starts: one line naming the URL, exit 2, quickly.

Each case runs ``featcache.cli.main`` against the test SeaweedFS server (``s3_env``), which enforces
its credentials (tests/support/seaweed.py writes an ``-s3.config`` identities file), or against a
closed port for an unreachable endpoint.
"""

from __future__ import annotations

import time
import uuid

import pytest

from featcache.cli import main
from tests.support.seaweed import free_ports

#: well under botocore's default retries and 60 s connect timeout: the preflight makes one attempt
QUICK_S = 15.0

#: argv for each command whose source (or output) may live on S3; the teacher cannot be fetched offline,
#: so a case that reports the S3 problem also shows it came before the teachers were described.
COMMANDS = {
    "index": lambda src, out: ["index", src, "--out", out],
    "extract": lambda src, out: ["extract", "--source", src, "--out", out, "--teacher", "preset=dinov3-7b"],
}


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], float]:
    """Exit code, stderr lines and seconds of ``featcache ARGV``."""
    t0 = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - t0
    return code, capsys.readouterr().err.strip().splitlines(), seconds


def assert_one_line(result, *fragments: str) -> None:
    """Exit 2, one stderr line holding every fragment, within QUICK_S."""
    code, err, seconds = result
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("featcache: error:"), err
    assert all(f in err[0] for f in fragments), err[0]
    assert seconds < QUICK_S, f"took {seconds:.1f} s"


@pytest.fixture
def closed_endpoint(s3_env, monkeypatch) -> str:
    """Point s3fs at a loopback port nobody listens on."""
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    for name in ("AWS_ENDPOINT_URL", "FEATCACHE_S3_ENDPOINT"):
        monkeypatch.setenv(name, endpoint)
    return endpoint


@pytest.fixture
def local_images(tmp_path) -> str:
    """A local folder with one file: a source that exists (the preflight runs before it is read)."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not really a jpeg")
    return str(folder)


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_endpoint_for_the_source(command, closed_endpoint, tmp_path, capsys):
    src = "s3://b/images"
    result = run_cli(COMMANDS[command](src, str(tmp_path / "out")), capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for {src}", "connection refused")
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_endpoint_for_the_output(command, closed_endpoint, local_images, capsys):
    out = "s3://b/cache"
    result = run_cli(COMMANDS[command](local_images, out), capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for {out}")


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variable, value", [("AWS_SECRET_ACCESS_KEY", "wrong-secret"),
                                             ("AWS_ACCESS_KEY_ID", "nobody")])
def test_refused_credentials(command, variable, value, s3_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(variable, value)
    result = run_cli(COMMANDS[command](s3_root, str(tmp_path / "out")), capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {s3_root}")


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_credentials(command, s3_root, monkeypatch, tmp_path, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    result = run_cli(COMMANDS[command](s3_root, str(tmp_path / "out")), capsys)
    assert_one_line(result, f"S3 credentials missing or refused for {s3_root}")


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_bucket_for_the_source(command, s3_env, tmp_path, capsys):
    bucket = f"missing{uuid.uuid4().hex[:12]}"
    result = run_cli(COMMANDS[command](f"s3://{bucket}/images", str(tmp_path / "out")), capsys)
    assert_one_line(result, f"no bucket '{bucket}'", f"s3://{bucket}/images")
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_bucket_for_the_output(command, s3_env, local_images, capsys):
    bucket = f"missing{uuid.uuid4().hex[:12]}"
    result = run_cli(COMMANDS[command](local_images, f"s3://{bucket}/cache"), capsys)
    assert_one_line(result, f"no bucket '{bucket}'", f"s3://{bucket}/cache")


@pytest.mark.s3
@pytest.mark.parametrize("command", ["inspect", "verify", "stats"])
def test_readers_report_a_missing_bucket(command, s3_env, capsys):
    bucket = f"missing{uuid.uuid4().hex[:12]}"
    result = run_cli([command, f"s3://{bucket}/cache"], capsys)
    assert_one_line(result, f"no bucket '{bucket}'", f"s3://{bucket}/cache")


@pytest.mark.s3
@pytest.mark.parametrize("command", ["inspect", "verify", "stats"])
def test_readers_report_an_unreachable_endpoint(command, closed_endpoint, capsys):
    result = run_cli([command, "s3://b/cache"], capsys)
    assert_one_line(result, f"cannot reach the S3 endpoint {closed_endpoint} for s3://b/cache")


def test_missing_source_is_reported_before_the_teachers_are_fetched(tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (tests/conftest.py): describing preset=dinov3-7b would fail to fetch its config
    (tmp_path / "empty").mkdir()
    result = run_cli(["extract", "--out", str(tmp_path / "empty"), "--teacher", "preset=dinov3-7b"], capsys)
    assert_one_line(result, f"{tmp_path / 'empty'} has no manifest and no source was given")
