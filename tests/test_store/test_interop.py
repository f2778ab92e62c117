"""What tools featcache does not control read: ``errors.parquet`` always there, ``inspect``/``verify --json``."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

import featcache
from featcache.cli import main
from featcache.stats.compute import compute_view
from featcache.store import FORMAT_VERSION, Cache, tables
from tests.support.caches import make_cache, write_all
from tests.support.images import write_nested_small_pngs


def test_index_of_clean_files_writes_an_empty_errors_table(tmp_path):
    write_nested_small_pngs(tmp_path / "src", 5, per_folder=5, fanout=1)
    result = featcache.index(tmp_path / "src", tmp_path / "c")
    table = pq.read_table(tmp_path / "c" / "errors.parquet")
    assert result.images == 5 and not result.failed
    assert table.num_rows == 0 and table.schema.equals(tables.ERRORS_SCHEMA)


def test_extract_finalize_writes_an_empty_errors_table(tmp_path):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=8, shard_size=4)
    write_all(view)  # no failed row: rebuild_errors still writes the table
    table = pq.read_table(os.path.join(root, "errors.parquet"))
    assert table.num_rows == 0 and table.schema.equals(tables.ERRORS_SCHEMA)


def test_cache_errors_is_a_table_property(tmp_path):
    root = str(tmp_path / "cache")
    cache, view = make_cache(root, n=10, shard_size=4)
    assert isinstance(cache.errors, pa.Table) and cache.errors.num_rows == 0  # an older cache: no file yet
    assert cache.errors.schema.equals(tables.ERRORS_SCHEMA)
    write_all(view, errors={6: "decode: corrupt JPEG"})
    rows = cache.errors.to_pylist()  # not cached: the job's rewrite shows at once
    assert [(r["index"], r["stage"], r["view"], r["reason"]) for r in rows] == [(6, "decode", view.key, "corrupt JPEG")]


def test_inspect_json_has_the_documented_keys(tmp_path, capsys):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view)
    compute_view(view)
    assert main(["inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    v = info["views"][view.key]
    stats = Cache.open(root).view(view.key).stats
    assert (info["format"], info["num_images"], info["shard_size"]) == (FORMAT_VERSION, 10, 4)
    assert (v["grid"], v["channels"], v["codec"]) == ([4, 6], 8, "f16")
    assert (v["shards_committed"], v["shards_total"]) == (3, 3) and v["bytes"] == v["bytes_stored"] > 10 * 4 * 6 * 8 * 2
    assert v["stats"] == {"alpha": stats["alpha"], "dispersion": stats["dispersion"], "tokens": stats["tokens"]}
    assert v["stats"]["tokens"] == 10 * 4 * 6 and v["stats"]["alpha"] > 0
    assert info["images"] == 10 and v["shards"] == {"committed": 3, "total": 3}  # the earlier keys stay


def test_inspect_json_stats_null_before_stats(tmp_path, capsys):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=8, shard_size=4)
    write_all(view)
    assert main(["inspect", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"][view.key]["stats"] is None


def test_verify_json_on_a_healthy_cache(tmp_path, capsys):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view, errors={6: "decode failed"})
    assert main(["verify", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": True, "format": FORMAT_VERSION, "problems": [], "notes": [], "shards_checked": 3}


def test_verify_json_on_a_damaged_cache(tmp_path, capsys):
    root = str(tmp_path / "cache")
    _, view = make_cache(root, n=10, shard_size=4)
    write_all(view)
    path = os.path.join(view.loc.path, "dense", "c", "1", "0", "0", "0")
    with open(path, "r+b") as f:  # a byte inside image 5's chunk payload
        f.seek(4 * 6 * 8 * 2 + 4 + 17)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    assert main(["verify", root, "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["ok"] is False and out["shards_checked"] == 3 and out["format"] == FORMAT_VERSION
    assert [(p["view"], p["shard"], p["kind"]) for p in out["problems"]] == [(view.key, 1, "checksum")]
    assert "dense/c/1/0/0/0" in out["problems"][0]["detail"]
