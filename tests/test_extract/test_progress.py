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


def test_images_of_shards_in_flight_count_until_their_shard_ends_or_is_lost():
    out = io.StringIO()
    p = Progress(20, out, interval=0.0)
    p.partial(0, 3)
    p.partial(1, 2)
    assert p.done == 5
    p.partial(0, 4)
    p.add(10, 1, shard=0)  # shard 0 ended: its 10 images replace the 4 seen so far
    assert p.done == 12 and p.failed == 1
    p.forget(1)  # shard 1's worker died: its images are not done
    assert p.done == 10
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("progress: 10/20 images (50%)")
