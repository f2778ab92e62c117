"""``verify`` passes a healthy cache and catches each kind of damage, one test per case."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import featcache
from featcache.cli import main
from featcache.extract.finalize import rebuild_errors
from featcache.store.location import locate
from featcache.store import attrs as attrs_json
from tests.support.caches import make_cache, shard_data, write_all


@pytest.fixture
def healthy(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view, errors={6: "decode failed"})
    return root, view


def _kinds(root: str) -> set[str]:
    return {p.kind for p in featcache.verify(root).problems}


def _object(view, key: str) -> str:
    return os.path.join(view.loc.path, *key.split("/"))


def test_healthy_cache_verifies_clean(healthy):
    root, _ = healthy
    report = featcache.verify(root)
    assert report.ok and report.shards_checked == 3 and not report.notes
    assert main(["verify", root]) == 0


def test_flipped_byte_in_a_stored_chunk(healthy):
    root, view = healthy
    path = _object(view, "dense/c/1/0/0/0")
    chunk_bytes = 4 * 6 * 8 * 2 + 4
    with open(path, "r+b") as f:  # a byte inside image 5's chunk payload
        f.seek(chunk_bytes + 17)
        b = f.read(1)
        f.seek(chunk_bytes + 17)
        f.write(bytes([b[0] ^ 0x40]))
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("checksum", 1)]
    assert "dense/c/1/0/0/0" in problems[0].message
    assert main(["verify", root]) == 1


def test_deleted_chunk_object(healthy):
    root, view = healthy
    os.remove(_object(view, "summary/c/2/0"))
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("missing", 2)]


def test_commit_marker_without_data(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    view.write_shard(0, **shard_data(view, 0))
    marker = json.loads(open(os.path.join(root, "_commits", view.key, "0.json")).read())
    marker.update(shard=1, start=4, stop=8)  # a marker for a shard that was never written
    locate(root).join("_commits", view.key, "1.json").write_bytes_atomic(json.dumps(marker).encode())
    problems = featcache.verify(root).problems
    assert {(p.kind, p.shard) for p in problems} == {("missing", 1)}
    assert len(problems) == 4  # dense, summary, box, valid


def test_nan_in_a_row(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view)
    data = shard_data(view, 2)
    data["dense"][1, 2, 3, 4] = np.nan  # image 9
    view.write_shard(8, **data)
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("nonfinite", 2)]
    assert "[9]" in problems[0].message


def test_nan_in_a_failed_row_is_fine(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=4, shard_size=4)
    data = shard_data(view, 0)
    data["dense"][2] = np.nan
    view.write_shard(0, **data, errors={2: "teacher produced NaN"})
    rebuild_errors(view.cache, [view.key])
    assert featcache.verify(root).ok


def test_valid_disagreeing_with_the_commit(healthy):
    root, view = healthy
    path = os.path.join(root, "_commits", view.key, "1.json")
    marker = json.loads(open(path).read())
    marker["errors"] = {}  # the commit now claims row 6 succeeded; valid[6] is 0
    locate(path).write_bytes_atomic(json.dumps(marker).encode())
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("valid", 1), ("errors-table", 1)]
    assert "[6]" in problems[0].message


def test_errors_table_disagreeing_with_the_commit(healthy):
    root, view = healthy
    from featcache.store import tables

    rows = [{"index": 2, "image_id": "img00002", "uri": "/data/img00002.jpg", "stage": "teacher",
             "view": view.key, "reason": "out of memory"}]
    tables.write_table(locate(root).join(tables.ERRORS), tables.errors_table(rows))
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("errors-table", 0), ("errors-table", None)]
    assert "rows [6] failed" in problems[1].message  # and row 6, failed in its commit, is no longer listed


def test_interrupted_write_is_a_note_not_a_problem(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=8, shard_size=4)
    view.write_shard(0, **shard_data(view, 0))
    view.write_shard(4, **shard_data(view, 1))
    os.remove(os.path.join(root, "_commits", view.key, "1.json"))
    report = featcache.verify(root)
    assert report.ok and report.shards_checked == 1
    assert len(report.notes) == 1 and "shard 1" in report.notes[0]


def test_a_commit_listing_a_row_outside_its_shard_is_a_problem_not_a_crash(healthy):
    root, view = healthy
    path = os.path.join(root, "_commits", view.key, "1.json")
    marker = json.loads(open(path).read())
    marker["errors"]["40"] = "made up"  # row 40: not in shard 1, not even in the cache
    locate(path).write_bytes_atomic(json.dumps(marker).encode())
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("commit", 1)] and "outside its rows [4, 8)" in problems[0].message


def test_a_truncated_view_metadata_file_is_a_problem(healthy, capsys):
    root, view = healthy
    path = os.path.join(view.loc.path, "zarr.json")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    problems = featcache.verify(root).problems
    assert [(p.kind, p.view) for p in problems] == [("metadata", view.key)]
    assert main(["verify", root]) == 1
    capsys.readouterr()
    assert main(["inspect", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "view dinov3@224 cannot be opened" in err[0]


def test_a_deleted_errors_table_is_a_problem(healthy):
    root, _ = healthy
    os.remove(os.path.join(root, "errors.parquet"))
    problems = featcache.verify(root).problems
    assert [(p.kind, p.shard) for p in problems] == [("errors-table", None)] and "rows [6]" in problems[0].message


def test_an_edited_image_count_is_a_problem(healthy):
    root, _ = healthy
    path = os.path.join(root, "features.zarr", "zarr.json")
    meta = json.loads(open(path).read())
    meta["attributes"]["featcache"] = attrs_json.encode({**attrs_json.read(meta["attributes"]), "num_images": 12})
    open(path, "w").write(json.dumps(meta))
    problems = featcache.verify(root).problems
    assert [(p.kind, p.view) for p in problems] == [("metadata", "features.zarr")] and "12 images" in problems[0].message


def test_a_folder_that_is_not_a_view_is_a_note(healthy):
    root, _ = healthy
    os.makedirs(os.path.join(root, "features.zarr", "scratch", "x"))
    report = featcache.verify(root)
    assert report.ok and report.notes == ["features.zarr/scratch: a folder that is not a view (left alone)"]
