"""Progress output: plain periodic lines when not a terminal, one rewritten line on a terminal."""

from __future__ import annotations

import io

from featcache.extract.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(100, out, interval=0.0)
    p.add(40, 2)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("progress: 40/100 images (40%)") and lines[0].endswith("failed 2")
    assert "images/s  ETA " in lines[0] and "\r" not in out.getvalue()


def test_one_live_line_on_a_terminal():
    out = _Terminal()
    p = Progress(10, out)
    p.add(10, 0)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r10/10 images (100%)") and text.endswith("\n") and text.count("\n") == 1
    assert "ETA 0:00" in text
