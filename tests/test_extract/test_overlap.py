"""The overlapped ShardWorker (compute thread, bounded write queue, writer thread, look-ahead of the
next shard) against the sequential one (``write_queue=0``, everything in the caller's thread).

Same shards, same real photos (one of them truncated, so shards have failed rows and batches have
gaps), the three tiny teachers in f16, f32 and a SAM3 mosaic: the stored objects must be the same
bytes; progress must still move per batch; the records must account for each shard's time; a
write refused by the storage must raise the same one-line StorageError from the same call.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
from featcache.errors import StorageError
from featcache.extract.config import from_dict
from featcache.extract.plan import prepare
from featcache.extract.worker import STAGES, ShardWorker
from tests.test_extract.test_faults import _tree
from tests.test_extract.test_storage_errors import _mounted, _remount

MODES = {"sequential": 0, "overlapped": 1}
PARTS = ("decode_wait", "compute", "queue_wait", "write")  # with - overlapped: the call's wall time


@pytest.fixture(scope="module")
def base(tmp_path_factory, photos_dir):
    """An indexed cache of the ten photos and a truncated PNG (indexed fine, fails to decode) at row 1."""
    folder = tmp_path_factory.mktemp("overlap_photos")
    for path in photos_dir.iterdir():
        shutil.copyfile(path, folder / path.name)
    data = (photos_dir / "astronaut.png").read_bytes()
    (folder / "b_half.png").write_bytes(data[:len(data) // 2])
    root = tmp_path_factory.mktemp("overlap_base") / "cache"
    featcache.index(str(folder), str(root))
    return root


def _job(out, base, models, **overrides):
    d = {"source": str(base), "output": str(out), "shard_size": 4, "batch_size": 3, "stats": False, "teachers": [
        {"family": "siglip2", "source": models["siglip2"], "codec": "f32"},
        {"family": "dinov3", "source": models["dinov3"], "resolutions": [64, 96]},
        {"family": "sam3", "source": models["sam3"], "mosaic": 2}]}
    d.update(overrides)
    return from_dict(d, "overlap test")


def _worker(plan, write_queue: int) -> ShardWorker:
    return ShardWorker(plan.config.output, [t.to_dict() for t in plan.teachers],
                       [v.to_dict() for v in plan.views], batch_size=3, write_queue=write_queue)


def _process_all(worker: ShardWorker, shards: list[int]) -> list[dict]:
    """One call per shard, naming the next one, as the Ray driver does."""
    nexts = shards[1:] + [None]
    return [worker.process(shard, prefetch=after) for shard, after in zip(shards, nexts)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base, job_teachers):
    """mode -> (cache root, the records, the (shard, images) that progress() showed meanwhile)."""
    out = {}
    for mode, write_queue in MODES.items():
        plan = prepare(_job(tmp_path_factory.mktemp(mode) / "cache", base, job_teachers))
        worker = _worker(plan, write_queue)
        seen, finished = [], threading.Event()

        def watch():
            while not finished.is_set():
                seen.append(tuple(worker.progress().values()))
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            records = _process_all(worker, sorted(plan.todo))
        finally:
            finished.set()
            watcher.join()
            worker.close()
        out[mode] = (Path(plan.config.output), records, seen)
    return out


def _markers(root: Path) -> dict[str, dict]:
    """Every commit marker's rows, errors and checksums (what a reader trusts), by view/shard."""
    markers = {}
    for path in sorted((root / "_commits").glob("*/*.json")):
        m = json.loads(path.read_text())
        markers[f"{path.parent.name}/{path.stem}"] = {k: m[k] for k in ("start", "stop", "errors", "checksums")}
    return markers


def test_overlapped_output_is_byte_identical_to_the_sequential_one(runs):
    seq, ovl = runs["sequential"][0], runs["overlapped"][0]
    got, want = _tree(ovl), _tree(seq)
    assert sorted(got) == sorted(want) and len(want) > 40
    assert [k for k in want if got[k] != want[k]] == []
    markers = _markers(seq)
    assert _markers(ovl) == markers and len(markers) == 4 * 3  # four views x three shards
    assert markers["dinov3@64/0"]["errors"] == {"1": markers["dinov3@64/0"]["errors"]["1"]}  # the truncated PNG
    assert "decode:" in markers["dinov3@64/0"]["errors"]["1"]


def test_stored_f16_is_numpy_s_rounding_of_the_float32_features():
    """The cast now happens on the device (torch) instead of on the host (numpy): same bits, so
    caches written before and after agree, overflow and subnormals included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200_000, generator=g) * s for s in (1e-8, 1e-6, 1e-4, 1.0, 1e3, 7e4)])
    x = torch.cat([x, torch.tensor([65504.0, 65519.99, 65520.0, -65536.0, 6.1e-5, 5.96e-8, 2.98e-8, -0.0])])
    with np.errstate(over="ignore"):  # overflowing to inf is part of what is compared
        host = x.numpy().astype(np.float16)
    assert np.array_equal(x.to(torch.float16).numpy().view(np.uint16), host.view(np.uint16))


def test_progress_moves_per_batch_in_both_modes(runs):
    for mode, (_, _, seen) in runs.items():
        for shard, size in ((0, 4), (1, 4), (2, 3)):
            counts = [n for s, n in seen if s == shard]
            assert counts == sorted(counts), (mode, shard)
            assert set(counts) - {0, size}, (mode, shard, sorted(set(counts)))  # something between none and all


def test_records_break_each_shard_down_and_account_for_its_time(runs):
    for mode, (_, records, _) in runs.items():
        assert [r["shard"] for r in records] == [0, 1, 2] and [r["failed"] for r in records] == [1, 0, 0]
        for r in records:
            s = r["seconds"]
            assert set(s) == {*STAGES, "overlapped", "total"} and min(s.values()) >= 0, s
            busy = sum(s[k] for k in PARTS)
            assert s["overlapped"] == pytest.approx(max(0.0, busy - s["total"]), abs=0.003), s
            assert busy >= s["total"] - 0.05 - 0.15 * s["total"], s  # no wait left unaccounted for
            device = s["views"] + s["forward"] + s["encode"] + s["d2h"]
            assert device - 0.01 <= s["compute"] <= device + 0.05 + 0.2 * device, s  # on the CPU
            assert s["forward"] > 0 and s["views"] > 0 and s["write"] > 0
            if mode == "sequential":
                assert s["queue_wait"] == 0 and s["overlapped"] <= 0.01, s
                assert busy <= s["total"] + 0.01, s


def test_a_refused_write_is_the_same_one_line_storage_error_and_nothing_is_written_ahead(
        tmp_path_factory, base, job_teachers):
    out = tmp_path_factory.mktemp("refused") / "cache"
    plan = prepare(_job(out, base, job_teachers, teachers=[{"family": "dinov3", "source": job_teachers["dinov3"]}]))
    blocked = out / "features.zarr" / "dinov3@64" / "dense" / "c" / "1"
    commits = out / "_commits" / "dinov3@64"
    errors, committed = {}, {}
    with _mounted(blocked, "size=1m"):  # shard 1's dense object goes on a disk that turns read-only
        _remount(blocked, "ro")
        for mode, write_queue in MODES.items():  # the sequential worker is the path every job took before
            worker = _worker(plan, write_queue)
            try:
                worker.process(0, prefetch=1)
                with pytest.raises(StorageError) as raised:
                    worker.process(1, prefetch=2)
                errors[mode], committed[mode] = raised.value, sorted(p.name for p in commits.iterdir())
            finally:
                worker.close()
        worker = _worker(plan, MODES["overlapped"])
        worker.process(2)  # what follows an error: the next call works
        worker.close()
    seq, ovl = errors["sequential"], errors["overlapped"]
    assert type(ovl) is type(seq) and str(ovl) == str(seq) and ovl.errno == seq.errno
    assert str(seq).startswith("read-only file system writing ") and "\n" not in str(seq)
    assert str(seq).endswith(": write to a writable location, or remount it read-write")
    assert committed == {"sequential": ["0.json"], "overlapped": ["0.json"]}  # 2 computed ahead, not written
    assert sorted(p.name for p in commits.iterdir()) == ["0.json", "2.json"]
