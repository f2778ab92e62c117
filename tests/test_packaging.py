"""What the package installs and declares: no generic top-level names, and dependency floors that
agree with what the installed dependencies themselves require."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
#: dependencies whose own requirements bound ours, with the extras featcache uses of them
REQUIRERS = {"transformers": {"torch"}, "zarr": set(), "ray": set()}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(floors) if floors else None


def test_the_wheel_installs_only_the_featcache_package(tmp_path):
    """pipelines/ and train/ ship as featcache.pipelines and featcache.train: a user's own `pipelines`
    package is never shadowed."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("featcache-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["featcache"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"featcache"}
    assert {"featcache/pipelines/extract.py", "featcache/pipelines/stats.py", "featcache/train/__init__.py",
            "featcache/store/cache.py"} <= set(names)


def test_every_package_of_the_source_tree_is_declared():
    """pyproject lists packages by name: a folder left out of the list ships nothing (featcache.upsample
    and featcache.sources were missing from wheels). Checked on the declaration itself: a wheel built
    in place can pick stale modules up from build/."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    homes = {"featcache": REPO / "featcache", **{name: REPO / d for name, d in tool["package-dir"].items()}}
    found = set()
    for name, folder in homes.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if not any(p.startswith(".") or p == "__pycache__" for p in parts):
                found.add(".".join((name, *parts)))
    assert found == set(tool["packages"])


def test_declared_floors_are_at_least_what_the_installed_dependencies_require():
    """E.g. transformers 5 requires torch >= 2.6: a floor of torch >= 2.4 would install a torch it refuses."""
    declared = _declared()
    too_low = []
    for requirer, extras in REQUIRERS.items():
        for text in metadata.requires(requirer) or []:
            req = Requirement(text)
            env = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
                continue
            ours, theirs = declared.get(req.name.lower()), _floor(req)
            if ours is not None and theirs is not None and (_floor(ours) or Version("0")) < theirs:
                too_low.append(f"{ours} but {requirer} {metadata.version(requirer)} requires {req}")
    assert not too_low, too_low


def test_the_declared_floors_hold_in_this_environment():
    """Every declared dependency is installed at a version its specifier accepts."""
    for name, req in _declared().items():
        version = re.sub(r"\+.*", "", metadata.version(name))  # local labels (2.13.0+cpu) do not count
        assert req.specifier.contains(version, prereleases=True), (name, version, str(req))


def test_the_gpu_benchmarks_modules_import_without_zarr_ray_or_s3fs():
    """A GPU machine lent for a benchmark holds torch and transformers but no zarr, Ray or s3fs: the
    modules its benchmarks use (teachers, roofline, student and losses, geometry, upsampler) import
    there, and the package's API reaches zarr only when used."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('zarr', 'ray', 's3fs'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import featcache, featcache.roofline, featcache.teachers.presets, featcache.geometry, featcache.decode\n"
        "import featcache.train.student, featcache.train.losses, featcache.upsample.featsharp\n"
        "from featcache.train import config\n"
        "try:\n"
        "    featcache.open_cache\n"
        "except ModuleNotFoundError as e:\n"
        "    print('api needs', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "api needs zarr"


#: how a lent GPU machine runs a benchmark: this checkout not installed, no zarr, Ray or s3fs
_AS_ON_A_GPU_MACHINE = (
    "import importlib.abc, runpy, sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')\n"
    "                    and 'editable' not in type(f).__module__]\n"
    "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in getattr(h, '__module__', '')]\n"
    "sys.path_importer_cache.clear()\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in ('zarr', 'ray', 's3fs'):\n"
    "            raise ModuleNotFoundError(name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(script, run_name='__main__')\n")


GPU_BENCHMARKS = [
    ("roofline_validation", ["--help"]), ("vitdet", ["--help"]), ("train_cost", ["--help"]),
    ("featsharp", ["--help"]), ("teacher_throughput", ["--help"]),
    ("gpu_extract", ["--device", "cpu", "--tiny", "--shards", "2", "--batch", "2", "--presets", "dinov3-7b"])]


def test_the_gpu_benchmarks_start_from_an_uninstalled_checkout_without_zarr(tmp_path):
    """featcache.train is train/ only through an install's package-dir mapping: roofline_validation.py and
    vitdet.py failed there (benchmarks/checkout.py maps it). The scripts start side by side (each is mostly
    imports), each with its own output file."""
    procs = []
    for script, args in GPU_BENCHMARKS:
        err = (tmp_path / f"{script}.err").open("w")
        procs.append((script, err, subprocess.Popen([sys.executable, "-c", _AS_ON_A_GPU_MACHINE,
                                                     f"benchmarks/{script}.py", *args], cwd=REPO,
                                                    stdout=subprocess.DEVNULL, stderr=err)))
    for script, err, proc in procs:
        code = proc.wait(timeout=300)
        err.close()
        assert code == 0, (script, (tmp_path / f"{script}.err").read_text()[-2000:])
