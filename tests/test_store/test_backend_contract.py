"""The storage contract (:class:`featcache.store.backend.Backend`) run over every backend: local disk,
memory and S3 on a real SeaweedFS server, as zarr-python's ``testing/store.py`` runs over every store.
And the rule that makes it the only way to bytes: outside ``featcache/store/`` no module of
featcache/, train/ or pipelines/ calls a filesystem method."""

from __future__ import annotations

import re
import threading
import time
import tokenize
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache.store.backend import Backend, MemoryBackend
from featcache.store.local import LocalBackend
from featcache.store.location import Location, locate
from featcache.store.s3 import S3Backend

REPO = Path(__file__).resolve().parents[2]
KINDS = {"local": LocalBackend, "memory": MemoryBackend, "s3": S3Backend}
DATA = bytes(range(256)) * 40  # 10 KiB, every byte value


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path) -> Location:
    """An empty folder on each backend."""
    if request.param == "local":
        yield locate(str(tmp_path / "root"))
    elif request.param == "memory":
        loc = locate(f"memory://featcache-{uuid.uuid4().hex}/root")
        yield loc
        if loc.exists():
            loc.delete(recursive=True)
    else:
        yield locate(request.getfixturevalue("s3_root"))


class TestBackend:
    """What every backend must do; featcache's callers rely on nothing else."""

    def test_the_url_picks_the_backend(self, root, request):
        assert isinstance(root.backend, Backend)
        assert type(root.backend) is KINDS[request.node.callspec.params["root"]]

    def test_write_then_read_whole_and_ranges(self, root):
        loc = root.join("a", "blob.bin")
        loc.write_bytes_atomic(DATA)
        assert loc.read_bytes() == DATA
        assert loc.backend.size(loc.path) == len(DATA)
        assert loc.backend.read_range(loc.path, 10, 20) == DATA[10:30]
        assert loc.backend.read_range(loc.path, len(DATA) - 5, 100) == DATA[-5:]  # fewer at the end
        data, stamp = loc.read_range(1000, 3000)
        assert data == DATA[1000:4000] and stamp == loc.stamp() and stamp.size == len(DATA)

    def test_upload_and_download_copy_local_files_whole(self, root, tmp_path):
        local = tmp_path / "big.bin"
        local.write_bytes(DATA * 100)  # 1 MiB
        loc = root.join("sets", "set-0000001", "state.safetensors")
        loc.upload(local)
        assert loc.read_bytes() == DATA * 100
        local.write_bytes(DATA)
        loc.upload(local)  # a second upload replaces the object whole
        back = tmp_path / "back.bin"
        loc.download(back)
        assert back.read_bytes() == DATA and loc.backend.size(loc.path) == len(DATA)
        assert loc.backend.find(root.join("sets").path) == [loc.path]  # no temporary object left beside it
        with pytest.raises(FileNotFoundError):
            root.join("nothing-here").download(tmp_path / "none.bin")

    def test_open_for_reading(self, root):
        loc = root.join("f.bin")
        loc.write_bytes_atomic(DATA)
        with loc.backend.open(loc.path) as f:
            f.seek(300)
            assert f.read(10) == DATA[300:310]
        for block in (None, 1024):
            with loc.backend.open_stamped(loc.path, block_size=block) as (f, stamp):
                assert f.read() == DATA and stamp == loc.stamp()

    def test_a_rewrite_replaces_the_whole_object_and_changes_its_stamp(self, root):
        loc = root.join("x.bin")
        loc.write_bytes_atomic(DATA)
        before = loc.stamp()
        time.sleep(0.05)  # a later clock tick: a local file's version is its mtime
        loc.write_bytes_atomic(DATA[::-1])  # the same size: only the version tells them apart
        assert loc.read_bytes() == DATA[::-1]
        assert loc.stamp() != before and loc.stamp().size == before.size
        assert root.backend.list(root.path) == [loc.path]  # no temporary sibling left

    def test_write_if_absent_second_writer_loses(self, root):
        loc = root.join("m", "marker.json")
        assert loc.write_bytes_if_absent(b"first") is True
        assert loc.write_bytes_if_absent(b"second") is False
        assert loc.read_bytes() == b"first"

    def test_write_if_absent_racing_writers_one_wins(self, root):
        if not isinstance(root.backend, (LocalBackend, MemoryBackend)):
            pytest.skip("through fsspec an object store checks then writes: racers both write (documented)")
        loc, results = root.join("race.json"), []
        threads = [threading.Thread(target=lambda k=k: results.append((k, loc.write_bytes_if_absent(b"%d" % k))))
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [k for k, won in results if won]
        assert len(winners) == 1 and loc.read_bytes() == b"%d" % winners[0]

    def test_list_find_glob_du(self, root):
        for name, size in (("a/x.bin", 3), ("a/b/y.bin", 5), ("a/b/z.txt", 7)):
            root.join(*name.split("/")).write_bytes_atomic(b"." * size)
        a = root.join("a")
        assert sorted(a.backend.list(a.path)) == sorted([a.join("b").path, a.join("x.bin").path])
        entries = {e["name"].rstrip("/"): e["type"] for e in a.backend.list(a.path, detail=True)}
        assert entries == {a.join("b").path: "directory", a.join("x.bin").path: "file"}
        assert a.backend.find(a.path) == [a.join("b", "y.bin").path, a.join("b", "z.txt").path, a.join("x.bin").path]
        assert a.backend.glob(a.join("*", "*.bin").path) == ([a.join("b", "y.bin").path], [])
        assert a.backend.du(a.path) == 15
        assert a.isdir() and not a.join("x.bin").isdir() and a.join("b").exists()
        assert a.at(a.join("x.bin").path).uri == a.join("x.bin").uri

    def test_delete(self, root):
        for name in ("d/one", "d/sub/two"):
            root.join(*name.split("/")).write_bytes_atomic(b"1")
        root.join("d", "one").delete()
        assert not root.join("d", "one").exists() and root.join("d", "sub", "two").exists()
        root.join("d").delete(recursive=True)
        assert not root.join("d", "sub", "two").exists()

    def test_missing_objects_raise_file_not_found(self, root):
        loc = root.join("nothing", "here.bin")
        assert not loc.exists()
        for call in (loc.read_bytes, lambda: loc.read_range(0, 10), loc.stamp,
                     lambda: loc.backend.size(loc.path), lambda: loc.backend.read_range(loc.path, 0, 4)):
            with pytest.raises(FileNotFoundError):
                call()
        with pytest.raises(FileNotFoundError):
            with loc.backend.open_stamped(loc.path):
                pass
        loc.delete()  # removing what is not there is no error (an S3 DELETE succeeds)
        loc.delete(recursive=True)
        assert loc.backend.find(root.path) == [] and loc.backend.glob(root.join("*.bin").path) == ([], [])

    def test_zarr_reads_what_zarr_wrote_through_the_backend(self, root):
        loc = root.join("z.zarr")
        array = zarr.create_array(loc.backend.zarr_store(loc.path, loc.uri), shape=(6,), chunks=(3,), dtype="i4")
        array[:] = np.arange(6)
        assert loc.join("zarr.json").exists() and len(loc.backend.find(loc.join("c").path)) == 2
        again = zarr.open_array(loc.backend.zarr_store(loc.path, loc.uri, read_only=True), mode="r")
        assert again[:].tolist() == [0, 1, 2, 3, 4, 5]


# ---- the rule: nothing outside featcache/store/ touches a filesystem ----------------------------------

#: A filesystem method called (``fs.ls(``, ``loc.fs.open(``), fsspec opened directly, or a Location
#: asked whether it is local: what only featcache/store/ may do.
FORBIDDEN = re.compile(r"\bfs\.\w+\s*\(|\bfsspec\.filesystem\b|\burl_to_fs\b|\.is_local\b|\.fs\b")


def _code_lines(path: Path) -> list[str]:
    """The lines of ``path`` with its comments and string literals (docstrings) blanked out."""
    lines = [list(line) for line in path.read_text().splitlines()]
    literal = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type not in literal:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                line = lines[r - 1]
                line[c0 if r == r0 else 0:c1 if r == r1 else len(line)] = " " * ((c1 if r == r1 else len(line))
                                                                                  - (c0 if r == r0 else 0))
    return ["".join(line) for line in lines]


def _violations(folders=("featcache", "train", "pipelines")) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            if (REPO / "featcache" / "store") in path.parents:
                continue
            source = path.read_text().splitlines()
            found += [f"{path.relative_to(REPO)}:{row}: {source[row - 1].strip()}"
                      for row, line in enumerate(_code_lines(path), 1) if FORBIDDEN.search(line)]
    return found


def test_no_module_outside_store_calls_a_filesystem_method():
    assert _violations() == []


def test_the_rule_finds_a_violation(tmp_path, monkeypatch):
    """The rule's own check: a module that calls fs.ls is named by file and line; a docstring is not."""
    bad = tmp_path / "featcache" / "bad.py"
    bad.parent.mkdir()
    bad.write_text('"""Mentions fs.ls( and loc.is_local in prose."""\nx = 1\nentries = loc.fs.ls(path)\n')
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert _violations(("featcache",)) == ["featcache/bad.py:3: entries = loc.fs.ls(path)"]
