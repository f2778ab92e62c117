"""How commands end: never by a native abort at interpreter exit (exit 134, "terminate called
without an active exception"), and a SIGTERM mid-extract as cleanly as a Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys

from featcache.manifest import index
from tests.support.images import photo

READ_AND_EXIT = "import sys; from featcache.store.location import locate; from featcache.store import tables; " \
                "tables.read_manifest(locate(sys.argv[1]))"


def test_reading_a_manifest_then_exiting_never_aborts(tmp_path):
    """``featcache index R; featcache stats R`` aborted 1 run in 2 (``inspect`` 2 in 8): Arrow's IO
    threads still reading the manifest when the interpreter finalized. 25 processes that read it and
    exit at once: one in five aborted before."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(photo("astronaut").read_bytes())
    index(str(src), str(tmp_path / "R"))
    codes = []
    for _ in range(5):  # five at a time: the abort is each process's own race, not one between them
        runs = [subprocess.Popen([sys.executable, "-c", READ_AND_EXIT, str(tmp_path / "R")], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(5)]
        codes += [(run.returncode, err) for run in runs for _, err in [run.communicate(timeout=60)]]
    assert codes == [(0, "")] * 25


def test_sigterm_mid_extract_ends_like_ctrl_c_with_143(tmp_path, photos_dir, job_teachers):
    """SIGTERM once the job runs: Ray's own handler exited 15 (or the process died by SIGABRT) after a
    native dump; now it unwinds as Ctrl-C does (Ray shut down, committed shards kept), one line, 143."""
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "featcache.cli", "extract", "--source", str(photos_dir), "--out",
                             str(out), "--teacher", f"family=dinov3,source={job_teachers['dinov3']}", "--no-stats",
                             "--shard-size", "1"], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # until the workers are loading: Ray runs, with its actors
        lines.append(line)
        if line.startswith("loading teachers on"):
            break
    assert lines and lines[-1].startswith("loading teachers on"), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest
    assert rest.strip().splitlines()[-1] == ("featcache: terminated (SIGTERM); committed shards are kept: the same "
                                             "command resumes"), rest
    for noise in ("Traceback", "SIGTERM received", "*** ", "terminate called", "Aborted"):  # Ray's native dump
        assert noise not in rest, rest


def test_a_ray_session_opened_off_the_main_thread_runs_and_shuts_ray_down():
    """A job run from a thread (a notebook's executor, a test) cannot set a signal handler there: the
    session must still yield and shut Ray down, or Ray's processes die with the thread that started them
    and take the process down a minute later."""
    import threading

    import ray

    from featcache.pipelines.ray_session import ray_session

    seen = {}

    def job():
        try:
            with ray_session(None):
                seen["resources"] = ray.cluster_resources().get("CPU")
        except BaseException as e:  # the thread's failure, kept for the assertion below
            seen["error"] = repr(e)
        seen["initialized_after"] = ray.is_initialized()

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(120)
    assert "error" not in seen, seen["error"]
    assert seen["resources"] and seen["initialized_after"] is False
