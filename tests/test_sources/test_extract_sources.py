"""index -> extract (Ray, embedded) from webdataset tars and a Parquet image table, local and on S3:
every stored array equals, byte for byte, the extraction of the same images as loose files."""

from __future__ import annotations

import dataclasses
import io
import uuid

import numpy as np
import pytest

import featcache
from featcache.extract.config import from_dict
from featcache.extract.plan import prepare
from featcache.extract.worker import ShardWorker
from featcache.store.location import locate
from featcache.pipelines.extract import run
from featcache.pipelines.ray_session import ray_session
from featcache.sources import row_uri, tar_uri
from featcache.store import tables
from tests.test_extract.conftest import stored
from tests.test_sources.conftest import DECODE_FAILS, GOOD, INDEX_FAILS, MEMBERS, SHARDS, labels

KEY = "dinov3@64"


@pytest.fixture(scope="module")
def runtime(s3_server):
    """One embedded Ray for the module, started with the S3 server's variables in its environment:
    its workers read sources from S3."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        with ray_session():
            yield s3_server


def _config(out, dinov3: str):
    return from_dict({"output": str(out), "shard_size": 4, "batch_size": 3, "stats": False,
                      "teachers": [{"family": "dinov3", "source": dinov3, "codec": "f32"}]})


def _index_and_extract(src: str, out, dinov3: str, direct: bool = False):
    """Index ``src`` into ``out`` and extract it; ``direct``: give ``src`` to extract, which indexes it."""
    if not direct:
        featcache.index(src, str(out))
    return run(dataclasses.replace(_config(out, dinov3), source=src if direct else None), stream=io.StringIO())


@pytest.fixture(scope="module")
def loose(layouts, dinov3, tmp_path_factory):
    """The loose files extracted by the per-shard worker without Ray (the same bytes as a Ray job:
    tests/test_extract/test_end_to_end.py), the reference every layout must equal."""
    out = tmp_path_factory.mktemp("loose") / "cache"
    featcache.index(str(layouts.loose), str(out))
    plan = prepare(_config(out, dinov3))
    worker = ShardWorker(str(out), [t.to_dict() for t in plan.teachers], [v.to_dict() for v in plan.views],
                         batch_size=3, write_queue=0)
    for shard in sorted(plan.todo):
        worker.process(shard)
    worker.close()
    return stored(out, KEY)


def _errors(out) -> list[dict]:
    return sorted(tables.read_errors(locate(str(out))).to_pylist(), key=lambda r: (r["stage"], r["uri"]))


def _assert_same_as_loose(out, result, want):
    assert result.exit_code == 1 and not result.failed_shards
    assert result.failed_images == len(DECODE_FAILS) + len(INDEX_FAILS)
    got = stored(out, KEY)
    assert int(want["valid"].sum()) == len(GOOD) - len(DECODE_FAILS) and np.abs(want["dense"]).sum() > 0
    for name in ("dense", "summary", "box", "valid"):
        assert np.array_equal(got[name], want[name]), name
    assert featcache.verify(str(out)).ok
    decoded = sorted((r["index"], r["reason"]) for r in _errors(out) if r["stage"] == "decode")
    assert [i for i, _ in decoded] == sorted(GOOD.index(sample) for sample in DECODE_FAILS)
    assert all(DECODE_FAILS[GOOD[i]] in reason for i, reason in decoded)


def _training_reads_the_same_bytes(out):
    """The trainer's reader gets each row's encoded image from wherever it lies (tar member, Parquet row)."""
    from featcache.store.loader import CacheReader

    reader, data = CacheReader(str(out), [KEY]), {(s, k): d for s in SHARDS for k, _, d in MEMBERS[s]}
    assert [reader.image_bytes(i) for i in range(len(GOOD))] == [data[sample] for sample in GOOD]


def _tar_checks(out, container_of):
    """The tar job's manifest and errors: ids, labels, member URIs naming the shard and the member."""
    manifest = featcache.open_cache(str(out)).manifest.to_pylist()
    keys = [(s, k) for s, k in GOOD]
    assert [r["image_id"] for r in manifest] == [f"{s}.tar/{k}" if k == "x_repeat" else k for s, k in keys]
    assert [r["label"] for r in manifest] == [labels()[sk] for sk in keys]
    errors = _errors(out)
    by_member = {r["uri"]: r for r in errors}
    for (shard, key), reason in DECODE_FAILS.items():
        row = by_member[tar_uri(container_of(shard), f"{key}.png")]
        assert row["stage"] == "decode" and reason in row["reason"] and row["image_id"] == key
    (shard, key), = INDEX_FAILS
    row = by_member[tar_uri(container_of(shard), f"{key}.jpg")]
    assert row["stage"] == "index" and row["image_id"] == key and "not a readable image" in row["reason"]


def test_tar_shards_extract_the_same_arrays_as_loose_files(runtime, loose, layouts, dinov3, tmp_path):
    out = tmp_path / "cache"
    source = f"{layouts.tars}/{{{SHARDS[0]}..{SHARDS[1]}}}.tar"
    result = _index_and_extract(source, out, dinov3, direct=True)
    _assert_same_as_loose(out, result, loose)
    _tar_checks(out, lambda shard: str(layouts.tars / f"{shard}.tar"))
    _training_reads_the_same_bytes(out)
    log = io.StringIO()  # a rerun stats the two tars (unchanged) instead of indexing them again
    again = run(dataclasses.replace(_config(out, dinov3), source=source), stream=log)
    assert again.skipped == again.shards and "lists the same images" in log.getvalue()


def test_parquet_table_extracts_the_same_arrays_as_loose_files(runtime, loose, layouts, dinov3, tmp_path):
    out = tmp_path / "cache"
    result = _index_and_extract(str(layouts.table), out, dinov3)
    _assert_same_as_loose(out, result, loose)
    _training_reads_the_same_bytes(out)
    manifest = featcache.open_cache(str(out)).manifest
    assert manifest.column("label").to_pylist() == [labels()[sk] for sk in GOOD]
    everything = [(s, k) for s in SHARDS for k, _, _ in MEMBERS[s]]
    (bad,) = INDEX_FAILS
    (row,) = [r for r in _errors(out) if r["stage"] == "index"]
    assert row["uri"] == row_uri(str(layouts.table), everything.index(bad)) and "not a readable image" in row["reason"]


def _bucket(server, layouts, files: dict[str, object]) -> str:
    bucket = f"t{uuid.uuid4().hex[:16]}"
    server.make_bucket(bucket)
    fs = server.filesystem()
    for key, path in files.items():
        fs.put_file(str(path), f"{bucket}/{key}")
    return bucket


@pytest.mark.s3
def test_tar_shards_on_s3(runtime, loose, layouts, dinov3, tmp_path):
    bucket = _bucket(runtime, layouts, {f"shards/{s}.tar": layouts.tars / f"{s}.tar" for s in SHARDS})
    out = tmp_path / "cache"
    result = _index_and_extract(f"s3://{bucket}/shards/{{{SHARDS[0]}..{SHARDS[1]}}}.tar", out, dinov3)
    _assert_same_as_loose(out, result, loose)
    _tar_checks(out, lambda shard: f"s3://{bucket}/shards/{shard}.tar")
    etags = set(featcache.open_cache(str(out)).manifest.column("etag").to_pylist())
    assert len(etags) == 2 and None not in etags  # each tar's ETag, checked by every ranged read


@pytest.mark.s3
def test_parquet_table_on_s3(runtime, loose, layouts, dinov3, tmp_path):
    bucket = _bucket(runtime, layouts, {"data/train.parquet": layouts.table})
    out = tmp_path / "cache"
    result = _index_and_extract(f"s3://{bucket}/data/train.parquet", out, dinov3)
    _assert_same_as_loose(out, result, loose)
    manifest = featcache.open_cache(str(out)).manifest
    assert set(manifest.column("container").to_pylist()) == {f"s3://{bucket}/data/train.parquet"}
