"""benchmarks/gpu_suite.py as a lent GPU machine starts it (checkout not installed; zarr, Ray and s3fs
blocked), in its dry run: every stage measures something, a broken or slow stage costs only itself, and
``--requirements`` names exactly what the suite's own code imports beyond torch, transformers and the stdlib."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.processes import wait_for
from tests.test_packaging import _AS_ON_A_GPU_MACHINE

REPO = Path(__file__).resolve().parents[1]
SUITE = "benchmarks/gpu_suite.py"
TEACHERS = ("siglip2-g-384", "dinov3-7b", "sam3")

#: run before the harness in every process of a suite (stage processes and DDP ranks start the same way):
#: records the top-level modules the checkout's own code imports (``import`` statements whose importer is
#: featcache, benchmarks or the script), one file per process
RECORDER = (
    "import atexit, builtins, os, sys\n"
    "_direct, _import = set(), builtins.__import__\n"
    "def _recording(name, globals=None, locals=None, fromlist=(), level=0):\n"
    "    if level == 0 and (globals or {}).get('__name__', '').split('.')[0] in (\n"
    "            'featcache', 'benchmarks', '__main__', '__mp_main__'):\n"
    "        _direct.add(name.split('.')[0])\n"
    "    return _import(name, globals, locals, fromlist, level)\n"
    "builtins.__import__ = _recording\n"
    "def _save():\n"
    "    with open(os.path.join(os.environ['GPU_SUITE_TRACE'], f'{os.getpid()}.txt'), 'w') as f:\n"
    "        f.write('\\n'.join(sorted(_direct)))\n"
    "atexit.register(_save)\n")

#: per stage, figures that must be finite and > 0: a stage that measures nothing fails here
MUST_BE_POSITIVE = {
    "teacher_mfu": [("presets", t, k) for t in TEACHERS for k in ("images_per_second", "mfu", "matmul_tflops")],
    "gpu_extract": [("presets", i, k) for i in range(3) for k in ("bare_images_per_second", "mfu",
                                                                   "pipeline_images_per_second", "efficiency",
                                                                   "bytes_per_image")],
    "train_cost": [("seconds", "cache_step_s"), ("seconds", "online_step_s"), ("ratio",), ("bound_run",),
                   ("student_step_flops_per_s",)],
    "ddp": [("bare_samples_per_s",), ("world_sizes", "1", "samples_per_s"), ("world_sizes", "2", "samples_per_s"),
            ("world_sizes", "2", "efficiency")],
    "featsharp": [("ms_per_image", "floor"), ("ms_per_image", "featsharp"), ("ratio_featsharp_to_floor",)],
    "roofline": [("peak_gflops",), ("bandwidth_gbps",), ("models", 0, "predicted_s"), ("models", 0, "measured_s")],
    "vitdet": [("rows", 0, k) for k in ("global_ms", "w8_ms", "w16_ms", "global_gflop")],
    "codec_decode": [("ms_per_batch", "int4_pca_decode"), ("ms_per_batch", "f16_phis_transform"), ("kept",)],
}
#: the dry run in concurrent groups (each suite process runs its stages one after another)
GROUPS = [("teacher_mfu", "gpu_extract", "train_cost", "codec_decode"), ("ddp", "featsharp", "roofline", "vitdet")]


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    """The suite under the GPU-machine harness, recording its imports; a marker in every one of its
    processes' command lines (they all start with the same ``-c`` code) finds any left behind."""
    trace = tmp_path / "trace"
    trace.mkdir(exist_ok=True)
    code = f"# gpu-suite-test {tmp_path}\n" + RECORDER + _AS_ON_A_GPU_MACHINE
    return subprocess.Popen([sys.executable, "-c", code, SUITE, *args], cwd=REPO, text=True,
                            stdout=(tmp_path / f"{name}.out").open("w"), stderr=(tmp_path / f"{name}.err").open("w"),
                            env=dict(os.environ, GPU_SUITE_TRACE=str(trace)))


def finish(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 120) -> tuple[int, str, str]:
    code = proc.wait(timeout=timeout)
    return code, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def run(tmp_path: Path, name: str, *args: str) -> tuple[int, str, str]:
    return finish(start(tmp_path, name, *args), tmp_path, name)


def left_behind(tmp_path: Path) -> list[str]:
    """Command lines of live processes that carry this test's marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"# gpu-suite-test {tmp_path}\n" in cmd:
            found.append(cmd)
    return found


def dig(figures, path: tuple):
    for key in path:
        figures = figures[key]
    return figures


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, Path]:
    """The whole dry run on the CPU, its stages split over concurrent suite processes: (stage records,
    the tables printed, the folder of import traces)."""
    tmp = tmp_path_factory.mktemp("dry")
    procs = [(f"group{i}", start(tmp, f"group{i}", "--dry-run", "--device", "cpu", "--out", str(tmp / f"group{i}.json"),
                                 "--stages", ",".join(stages))) for i, stages in enumerate(GROUPS)]
    stages, tables = {}, ""
    for name, proc in procs:
        code, out, err = finish(proc, tmp, name)
        assert code == 0, (name, out, err[-3000:])
        report = json.loads((tmp / f"{name}.json").read_text())
        assert report["dry_run"] is True and report["torch"] and report["device"].startswith("CPU")
        stages.update(report["stages"])
        tables += out
    assert not left_behind(tmp)  # the DDP ranks ended with their stage
    return stages, tables, tmp / "trace"


def test_every_stage_of_the_dry_run_measures_something(dry_run):
    """Every stage ran, is ok, and its key figures are finite positive numbers; the table has its row."""
    stages, tables, _ = dry_run
    assert set(stages) == set(MUST_BE_POSITIVE)
    for name, record in stages.items():
        assert record["ok"] is True and record["error"] is None, (name, record)
        assert record["seconds"] > 0
        for path in MUST_BE_POSITIVE[name]:
            value = dig(record["figures"], path)
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, path, value)
        assert any(line.split()[:2] == [name, "yes"] for line in tables.splitlines()), (name, tables)
    assert [r["preset"] for r in stages["gpu_extract"]["figures"]["presets"]] == list(TEACHERS)
    assert stages["ddp"]["figures"]["backend"] == "gloo"
    assert set(stages["ddp"]["figures"]["world_sizes"]) == {"1", "2"}
    assert stages["featsharp"]["figures"]["canvas"] == 3 * 64
    decode = stages["codec_decode"]["figures"]  # the device's decoding is the host's
    assert decode["max_abs_device_vs_host"] <= 1e-5 * decode["host_max_abs"] and 1 <= decode["kept"] <= 64


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` install: themselves and their requirements, recursively (no extras)."""
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_requirements_are_what_the_suite_imports_beyond_torch_and_transformers(dry_run, tmp_path):
    """--requirements prints the distributions of the modules the checkout's code imported in every process of
    the dry run, less the stdlib and what torch and transformers install; each one imports here."""
    traced = set()
    for f in dry_run[2].glob("*.txt"):
        traced |= set(f.read_text().split())
    assert {"torch", "featcache"} <= traced  # the recorder saw the stage processes
    ours = {"featcache", "benchmarks", "tests"}
    outside = {m for m in traced if m not in sys.stdlib_module_names and m not in ours}
    dists = packages_distributions()
    unknown = sorted(m for m in outside if m not in dists)
    assert not unknown, unknown
    needed = {canonicalize_name(d) for m in outside for d in dists[m]} - _closure(["torch", "transformers"])
    code, out, err = run(tmp_path, "requirements", "--requirements")
    assert code == 0, err
    printed = out.split()
    assert {canonicalize_name(p) for p in printed} == needed
    modules = {m for m, ds in dists.items() for d in ds if canonicalize_name(d) in needed} & outside
    for module in modules:
        importlib.import_module(module)
    assert len(modules) >= len(printed)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, tuple[Path, int, str, str]]:
    """Three suites side by side (each is mostly start-up), each in a folder of its own: a stage that fails
    (``fail``), a stage past a 7 s budget (``slow``), a suite sent SIGTERM while its DDP ranks run
    (``stopped``). Per name: (folder, exit status, stdout, stderr)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("fail", "slow", "stopped")}
    common = ("--dry-run", "--device", "cpu")
    procs = {"fail": start(dirs["fail"], "fail", *common, "--out", str(dirs["fail"] / "s.json"),
                           "--stages", "vitdet,featsharp", "--vitdet-sizes", "100"),
             "slow": start(dirs["slow"], "slow", *common, "--out", str(dirs["slow"] / "s.json"), "--stages", "ddp",
                           "--budget-s", "7"),
             "stopped": start(dirs["stopped"], "stopped", *common, "--out", str(dirs["stopped"] / "s.json"),
                              "--stages", "vitdet,ddp")}
    wait_for(lambda: any("--worker" in cmd for cmd in left_behind(dirs["stopped"])), timeout=90,
             what="the DDP ranks")
    procs["stopped"].send_signal(signal.SIGTERM)
    return {name: (dirs[name], *finish(proc, dirs[name], name)) for name, proc in procs.items()}


def test_a_failing_stage_is_recorded_and_the_next_one_still_runs(scenarios):
    """An input side the student cannot take fails the vitdet stage with its one-line error; featsharp after it
    still runs and is recorded; the exit status says a stage failed."""
    folder, code, out, err = scenarios["fail"]
    assert code == 1, err
    stages = json.loads((folder / "s.json").read_text())["stages"]
    assert list(stages) == ["vitdet", "featsharp"]
    assert stages["vitdet"]["ok"] is False and stages["vitdet"]["figures"] == {}
    assert "100x100" in stages["vitdet"]["error"] and "\n" not in stages["vitdet"]["error"]
    assert stages["featsharp"]["ok"] is True and stages["featsharp"]["figures"]["ms_per_image"]["featsharp"] > 0
    assert "Traceback" in (folder / "s.logs" / "vitdet.log").read_text()  # the whole story is kept


def test_a_stage_past_its_share_is_stopped_with_its_processes(scenarios):
    """The DDP stage (its ranks are processes of their own) overruns a 7 s budget: it is recorded as failed,
    nothing it started is left running, and the JSON file holds the record."""
    folder, code, out, err = scenarios["slow"]
    assert code == 1, err
    record = json.loads((folder / "s.json").read_text())["stages"]["ddp"]
    assert record["ok"] is False and "ran past its share" in record["error"] and record["seconds"] < 9
    assert not left_behind(folder)


def test_a_stopped_suite_keeps_what_finished_and_stops_its_running_stage(scenarios):
    """SIGTERM while the DDP stage's ranks run: the ranks and the stage end with the suite, and the JSON file
    holds the stage that finished before."""
    folder, code, out, err = scenarios["stopped"]
    assert code == 143, err
    assert not left_behind(folder)
    stages = json.loads((folder / "s.json").read_text())["stages"]
    assert list(stages) == ["vitdet"] and stages["vitdet"]["ok"] is True


def test_unknown_stages_are_refused_in_one_line(tmp_path):
    code, out, err = run(tmp_path, "unknown", "--stages", "teacher_mfu,mfu", "--out", str(tmp_path / "x.json"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "unknown stages mfu" in err and "teacher_mfu" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the default run would start")
def test_the_default_gpu_run_is_refused_in_one_line_without_a_gpu(tmp_path):
    code, out, err = run(tmp_path, "nogpu", "--out", str(tmp_path / "x.json"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no GPU" in err
    assert not (tmp_path / "x.json").exists()


def test_a_failing_rank_stops_the_others_and_is_named(tmp_path):
    """The DDP stage's launcher: a rank that fails kills the ranks still waiting and raises its own last line."""
    from benchmarks.ddp_scaling import wait_all

    logs, procs = [tmp_path / "rank0.log", tmp_path / "rank1.log"], []
    for cmd, log in zip((["sleep", "60"], [sys.executable, "-c", "import sys; sys.exit('rank 1 broke')"]), logs):
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, stderr=f))
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed: rank 1 broke"):
        wait_all(procs, logs)
    assert procs[0].returncode == -signal.SIGKILL
