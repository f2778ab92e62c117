"""Training from a cache on S3 refuses an unusable location as extract does: one line naming the
URL, exit 2, before any run folder exists (the preflight of ``featcache.fsio.check_reachable``)."""

from __future__ import annotations

import pytest

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
