"""``featcache`` with a record of every change this process makes under a folder, for tests that must show
which of several data-parallel processes writes a run folder.

    torchrun --standalone --nproc-per-node 2 -m tests.support.write_audit RUN LOGS train CACHE --out RUN ...

Python's audit events (PEP 578) name each file opened for writing, each folder made and each rename or removal;
those under RUN are appended to ``LOGS/rank-<RANK>.txt`` (one path per line, the event first), then the
command runs as ``featcache`` would run it. The event is raised before the call, whoever makes it (featcache,
the checkpoint writer, TensorBoard): only writes inside extension code (safetensors' Rust writer) escape it,
and those go to files the Python side names and renames first.
"""

from __future__ import annotations

import os
import sys

#: events that change the file system, and the argument naming the path
_CHANGES = {"os.mkdir": 0, "os.rename": 0, "os.remove": 0, "os.rmdir": 0, "os.truncate": 0, "shutil.rmtree": 0,
            "shutil.move": 0, "os.link": 1, "os.symlink": 1}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(folder: str, log: str):
    busy = []

    def hook(event: str, args: tuple) -> None:
        if busy:  # the record's own write
            return
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (mode is None and flags & _WRITE_FLAGS):
                return
        elif event in _CHANGES:
            path = args[_CHANGES[event]]
        else:
            return
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, str) or not os.path.abspath(path).startswith(folder):
            return
        busy.append(1)
        try:
            with open(log, "a") as f:
                f.write(f"{event} {path}\n")
        finally:
            busy.pop()

    return hook


def main() -> int:
    folder, logs, argv = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3:]
    os.makedirs(logs, exist_ok=True)
    log = os.path.join(logs, f"rank-{os.environ.get('RANK', '0')}.txt")
    open(log, "a").close()
    sys.addaudithook(_audit(folder, log))
    from featcache.cli import main as featcache

    return featcache(argv)


if __name__ == "__main__":
    sys.exit(main())
