"""Extraction into S3 (a real SeaweedFS server on loopback), including a server restart mid-job."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

import featcache
from featcache.extract.config import from_dict
from featcache.pipelines.extract import run
from tests.support.fixtures import private_s3_server  # noqa: F401
from tests.support.processes import wait_for
from tests.test_extract.conftest import direct

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _job(root, source, teachers):
    return from_dict({"source": str(source), "output": root, "shard_size": 1, "batch_size": 1, "max_retries": 4,
                      "teachers": [{"family": "dinov3", "source": teachers["dinov3"], "resolutions": [64, 96],
                                    "codec": "f32"}]}, "s3 job")


def test_s3_output_survives_a_server_restart(private_s3_server, monkeypatch, photos_dir,  # noqa: F811
                                             job_teachers):
    server = private_s3_server
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    # One botocore attempt per call, in the job's Ray workers too (they start with this environment): the
    # job's own shard retries, not the client's back-off of seconds, are what bridge the outage.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    server.make_bucket("jobs")
    root = "s3://jobs/cache"
    fs = server.filesystem()
    commits = lambda: fs.find("jobs/cache/_commits") if fs.exists("jobs/cache/_commits") else []  # noqa: E731
    log, result = io.StringIO(), {}
    job = threading.Thread(target=lambda: result.update(r=run(_job(root, photos_dir, job_teachers), stream=log)))
    job.start()
    try:
        wait_for(lambda: (fs.invalidate_cache() or len(commits()) >= 2), 120, interval=0.1, what="2 commits on S3")
        restarted_at = len(commits())
        server.stop()  # down until a shard failed and the job said it retries it
        wait_for(lambda: "retrying" in log.getvalue(), 120, interval=0.1, what="a shard retried")
        server.start()
    finally:
        job.join(timeout=300)
    fs.invalidate_cache()
    r = result["r"]
    assert r.exit_code == 0, log.getvalue()
    assert restarted_at < 20 and "retrying" in log.getvalue()
    report = featcache.verify(root)
    assert report.ok and report.shards_checked == 20
    cache = featcache.open_cache(root)
    for key in ("dinov3@64", "dinov3@96"):
        want = direct(cache, key)
        with cache.view(key).reader() as reader:
            got = np.stack([reader.read(i).dense for i in range(cache.num_images)])
        assert np.abs(got - want["dense"]).max() <= 1e-5
    assert not any("SECRET" in s or server.secret_key in s for s in
                   [fs.cat_file(p).decode(errors="ignore") for p in fs.find("jobs/cache/runs")])
