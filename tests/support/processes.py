"""Finding and killing the processes a test started (a driver and the Ray processes under it)."""

from __future__ import annotations

import os
import signal
import time


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, process title) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return ppid, title
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``: pid -> title."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info:
                table[int(name)] = info
    out, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, title) in table.items():
            if ppid == parent and pid not in out:
                out[pid] = title
                frontier.append(pid)
    return out


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
