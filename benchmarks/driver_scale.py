"""The extract driver at ImageNet-1k scale (issue 13): plan time, the job's end, and the time and peak
memory of a rerun of a complete cache, locally and on a SeaweedFS S3 server on loopback.

    PYTHONPATH=. python benchmarks/driver_scale.py [--rows 1281167] [--where local s3] [--no-baseline]

The cache is synthetic and made through the store's own functions (``tests/test_extract/test_scale.py``):
a manifest of ``--rows`` made-up images; four views (siglip2@64, dinov3@64/96/128 from tiny saved
teachers) created by ``prepare`` at their final shape, with no data; commit markers written by
``commits.write_commit`` from 32 threads as workers write them (one failed row in 97, the crc32c of each
object, worker and timings); frozen statistics. At shard 64 the full marker set is 4 x 20,019 = 80,076
files. Steps, each timed:

  1. markers for the first half of the shards, then the end of the job that wrote them (a rebuild from
     every marker: errors.parquet holds no record of markers yet);
  2. plan with half committed (``prepare``: one listing per view, no marker read);
  3. markers for the other half, then that job's end (``job_errors``: reads only those);
  4. a complete rerun (``pipelines.extract.run``) in a fresh process: its time (the interpreter's start
     and the module imports excluded, the imports ``run`` itself triggers included) and the process's
     peak resident memory (``ru_maxrss``);
     Then, in this process (modules imported), the two parts of it that list every view's commits:
     ``prepare`` and ``stats.run`` (frozen statistics are kept, but it lists each view's commits again
     and hashes the manifest again before it looks at them);
  5. unless ``--no-baseline``: a rebuild from all 80,076 markers, what every job's end cost before.

Targets: a complete rerun <= 30 s locally and on S3, driver peak <= 2 GB. The machine is shared: the
load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from featcache.extract.finalize import job_errors, rebuild_errors
from featcache.extract.plan import prepare
from featcache.pipelines import stats
from tests.support.seaweed import SeaweedServer
from tests.support.teachers import save_dinov3, save_siglip
from tests.test_extract.test_scale import (SHARD, VIEWS, failed_rows, freeze_stats, rerun_in_subprocess,
                                           scale_config, write_manifest, write_markers)

IMAGENET_TRAIN = 1_281_167


def timed(what: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    print(f"  {what:58s} {time.perf_counter() - t0:8.2f} s", flush=True)
    return out


def bench(root: str, teachers: dict, rows: int, baseline: bool, workdir: Path) -> None:
    config = scale_config(root, teachers)
    timed(f"manifest of {rows:,} rows", write_manifest, root, rows)
    plan = timed("create the 4 views (prepare, nothing committed)", prepare, config)
    n = plan.num_shards
    half = range(n // 2)
    timed(f"write {len(VIEWS) * len(half):,} markers (first half)", write_markers, plan.cache, VIEWS, half)
    timed(f"  its job's end: rebuild from {len(VIEWS) * len(half):,} markers", rebuild_errors, plan.cache, VIEWS)
    plan = timed("PLAN with half committed (prepare)", prepare, config)
    assert len(plan.todo) == n - len(half)
    rest = range(n // 2, n)
    timed(f"write {len(VIEWS) * len(rest):,} markers (second half)", write_markers, plan.cache, VIEWS, rest)
    found = timed(f"  its job's end: job_errors (reads those {len(VIEWS) * len(rest):,})", job_errors, plan)
    assert len(found) == len(VIEWS) * failed_rows(rows)
    timed("frozen statistics, consolidate (what that job's end did)", lambda: (
        freeze_stats(plan.cache, VIEWS), plan.cache.consolidate()))
    got = rerun_in_subprocess(config, str(workdir / "rerun.log"))
    assert got["skipped"] == n and got["processed"] == 0 and got["failed_images"] == failed_rows(rows)
    assert not got["damaged"]
    print(f"  {'COMPLETE RERUN (pipelines.extract.run, fresh process)':58s} {got['seconds']:8.2f} s   "
          f"peak RSS {got['peak_kib'] / 2**20:.2f} GiB ({got['imported_kib'] / 2**20:.2f} GiB after imports), "
          f"exit code {got['exit_code']}", flush=True)
    # where a rerun's time goes, in this process (modules already imported)
    timed("    its plan: prepare, all committed", prepare, config)
    timed("    its statistics: stats.run, every view frozen (what _stats runs)",
          lambda: stats.run(root, VIEWS, complete_only=True))
    if baseline:
        timed(f"  before: a job's end rebuilt from all {len(VIEWS) * n:,} markers", rebuild_errors, plan.cache, VIEWS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--where", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    args = ap.parse_args()
    print(f"{args.rows:,} rows, views {', '.join(VIEWS)}, shard {SHARD}; "
          f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teachers = {"siglip2": str(save_siglip(tmp / "siglip2")[0]), "dinov3": str(save_dinov3(tmp / "dinov3")[0])}
        if "local" in args.where:
            print("local disk:")
            bench(str(tmp / "cache"), teachers, args.rows, args.baseline, tmp)
        if "s3" in args.where:
            with SeaweedServer(tmp / "seaweed") as server:
                os.environ.update(server.env())  # s3fs (and the rerun's process) find the server here
                server.make_bucket("driver-scale")
                print(f"SeaweedFS S3 on loopback ({server.endpoint}):")
                bench("s3://driver-scale/cache", teachers, args.rows, args.baseline, tmp)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
