"""The CLI: help on every command, version, inspect output, verify exit codes, on local and S3 roots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import featcache
from featcache.cli import app, main
from tests.support.caches import make_cache, shard_data, write_all

COMMANDS = [c.name for c in app.registered_commands]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featcache.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command, capsys):
    """In-process, as the CLI runs it (``test_version`` starts ``python -m featcache.cli`` itself)."""
    assert main([command, "--help"]) == 0 and "Usage" in capsys.readouterr().out


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"featcache {featcache.__version__}"


def test_inspect_and_verify(cache_root, capsys):
    _, view = make_cache(cache_root, n=10, shard_size=4, tile=(2, 3))
    write_all(view, errors={3: "corrupt JPEG"})
    view.write_shard(8, **shard_data(view, 2, seed=5))  # a rewrite of a committed shard
    assert main(["inspect", cache_root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    v = info["views"][view.key]
    assert info["images"] == 10 and info["shard_size"] == 4
    assert v["arrays"]["dense"] == {"shape": [10, 4, 6, 8], "dtype": "float16"}
    assert v["shards"] == {"committed": 3, "total": 3} and v["images_committed"] == 10
    assert v["bytes_stored"] > 10 * 4 * 6 * 8 * 2 and v["stats"] is None
    assert main(["inspect", cache_root]) == 0
    assert "dinov3@224" in capsys.readouterr().out
    assert main(["verify", cache_root]) == 0
    assert "ok: 3 committed shards verified" in capsys.readouterr().out


@pytest.mark.s3
def test_verify_on_s3_catches_a_deleted_object(s3_root):
    _, view = make_cache(s3_root, n=8, shard_size=4)
    write_all(view)
    view.loc.fs.rm_file(view.loc.join("dense", "c", "1", "0", "0", "0").path)
    problems = featcache.verify(s3_root).problems
    assert [(p.kind, p.shard) for p in problems] == [("missing", 1)]
