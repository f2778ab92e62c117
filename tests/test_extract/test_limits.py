"""What ``extract`` refuses up front, in one line and before any folder is made: sizes that cannot fit
the machine (batch, shard) and workers the Ray cluster cannot place; and the ``--teacher`` help names
every key a teacher entry takes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from featcache.cli import main
from featcache.errors import UsageError
from featcache.extract import limits
from featcache.extract.config import TeacherConfig, from_dict
from featcache.extract.plan import view_specs
from featcache.extract.pools import ACTIVATION_FACTOR
from featcache.teachers import describe_teacher
from tests.test_cli_ux import _help


def test_teacher_help_names_every_teacher_key():
    text = _help("extract")
    keys = {f.name for f in dataclasses.fields(TeacherConfig)} | {"preset"}
    named = set(re.findall(r"(\w+)=", text.split("--teacher", 1)[1].split("--view-policy", 1)[0]))
    assert keys <= named, f"--teacher help does not name {sorted(keys - named)}"


def _extract(capfd, out, photos_dir, job_teachers, *flags) -> tuple[int, str]:
    """``featcache extract`` of the photos with the tiny DINOv3 (exit code, stderr). The Ray address
    is one no job can reach: a size that is not refused up front fails later, having made the folder."""
    code = main(["extract", "--source", str(photos_dir), "--out", str(out), "--teacher",
                 f"family=dinov3,source={job_teachers['dinov3']}", "--no-stats", "--ray-address", "not-an-address",
                 *flags])
    return code, capfd.readouterr().err


def test_absurd_shard_size_is_refused_before_any_folder(tmp_path, capfd, photos_dir, job_teachers):
    out = tmp_path / "cache"
    code, err = _extract(capfd, out, photos_dir, job_teachers, "--shard-size", "1000000000")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert re.fullmatch(r"featcache: error: shard_size 1000000000 needs [\d.]+ GiB of buffers per shard for "
                        r"dinov3@64, more than half of this machine's [\d.]+ GiB of memory: give a shard size of at "
                        r"most \d+", lines[0]), lines[0]
    assert not out.exists()


def test_batch_whose_activations_cannot_fit_is_refused_before_any_folder(tmp_path, capfd, photos_dir, job_teachers):
    spec = describe_teacher("dinov3", job_teachers["dinov3"])
    tokens = spec.grid()[0] * spec.grid()[1] + spec.prefix_tokens
    per_image = tokens * spec.channels * ACTIVATION_FACTOR
    n = int(limits.SHARE * limits.machine_memory() / per_image) + 1  # one image more than fits half the memory
    out = tmp_path / "cache"
    code, err = _extract(capfd, out, photos_dir, job_teachers, "--batch-size", str(n), "--shard-size", str(n))
    assert code == 2, err
    assert err.startswith(f"featcache: error: batch_size {n} needs ~") and f"at most {n - 1}\n" in err, err
    assert not out.exists()


def test_limits_are_exact_and_leave_ordinary_sizes_alone(job_teachers):
    spec = describe_teacher("dinov3", job_teachers["dinov3"])
    pairs = list(view_specs(0, TeacherConfig("dinov3", job_teachers["dinov3"], resolutions=(64, 96)), spec,
                            from_dict({"teachers": [{"family": "dinov3", "source": job_teachers["dinov3"]}]})))
    views = [v for _, v in pairs]
    per_row = sum(limits.row_bytes(v) for v in views)
    # per view: f16 dense (4x4, then 6x6 patches of 32 channels) and summary (32) twice, one index entry,
    # box (4 float32) and valid (1 byte)
    assert per_row == (2 * (16 * 32 * 2 + 32 * 2) + 16 + 17) + (2 * (36 * 32 * 2 + 32 * 2) + 16 + 17)
    gib = 2**30
    limits.check_sizes(64, 16, [spec], pairs, memory=gib)  # the defaults on a 1 GiB machine
    most = gib // 2 // per_row
    limits.check_shard_size(most, views, gib)
    with pytest.raises(UsageError, match=f"at most {most}$"):
        limits.check_shard_size(most + 1, views, gib)
    tokens = limits.forward_tokens(spec, [t for t, _ in pairs])
    assert tokens == 36 + spec.prefix_tokens  # the 96 px view's 6x6 patches and the prefix
    most = gib // 2 // (tokens * 32 * ACTIVATION_FACTOR)
    limits.check_batch_size(most, most, spec, tokens, gib)
    limits.check_batch_size(most + 1, most, spec, tokens, gib)  # a batch never spans two shards
    with pytest.raises(UsageError, match=f"at most {most}$"):
        limits.check_batch_size(most + 1, most + 1, spec, tokens, gib)


def test_placeable_counts_whole_actors_per_node():
    two_nodes = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 3.0, "GPU": 1.0}]
    assert limits.placeable(two_nodes, {"CPU": 1}) == 5
    assert limits.placeable(two_nodes, {"CPU": 2}) == 2  # one per node: 3 CPUs hold one 2-CPU actor
    assert limits.placeable(two_nodes, {"CPU": 1000}) == 0
    assert limits.placeable(two_nodes, {"CPU": 1, "GPU": 1 / 3}) == 3  # three thirds of a GPU, not 2.9999
    limits.check_placement(5, {"CPU": 1}, two_nodes)
    refused = r"cannot place 3 workers of 2 CPU each: its 2 nodes \(5 CPU in all\) can hold 2;"
    with pytest.raises(UsageError, match=refused):
        limits.check_placement(3, {"CPU": 2}, two_nodes)


@pytest.mark.slow
def test_workers_the_cluster_cannot_place_are_refused_not_waited_for(tmp_path, photos_dir, job_teachers):
    proc = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--source", str(photos_dir), "--out",
                           str(tmp_path / "cache"), "--teacher", f"family=dinov3,source={job_teachers['dinov3']}",
                           "--no-stats", "--shard-size", "2", "--cpu-workers", "2", "--threads-per-worker", "1000"],
                          capture_output=True, text=True, timeout=180)  # it waited forever
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "featcache: error: the Ray cluster cannot place 2 workers of 1000 CPU each: its 1 node ("), proc.stderr
