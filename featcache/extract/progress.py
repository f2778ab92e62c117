"""Progress of a running job: a live line on a terminal, periodic plain log lines otherwise; and
:func:`plural`, the one way its messages count things ("1 worker", "2 workers")."""

from __future__ import annotations

import sys
import time


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word`` in the number that fits: "1 shard", "0 shards", "2 shards"; ``many`` for
    a plural that is not ``word`` + "s"."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


class Progress:
    """Images done of ``total_images``: whole shards (:meth:`add`) plus the images of shards still
    in flight (:meth:`partial`, updated per batch); the rate counts from this object's creation."""

    def __init__(self, total_images: int, stream=None, interval: float = 10.0):
        self.total, self.finished, self.failed = total_images, 0, 0
        self.in_flight: dict[int, int] = {}
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.t0 = self._last = time.monotonic()

    def add(self, images: int, failed: int, shard: int | None = None) -> None:
        """Shard ``shard`` ended: its ``images`` count as done (no longer in flight)."""
        self.in_flight.pop(shard, None)
        self.finished += images
        self.failed += failed
        self.tick()

    def partial(self, shard: int, images: int) -> None:
        """``images`` of ``shard`` (still running) are done so far."""
        self.in_flight[shard] = images

    def forget(self, shard: int) -> None:
        """``shard`` stopped without a result (it will be retried or is lost): its images are not done."""
        self.in_flight.pop(shard, None)

    @property
    def done(self) -> int:
        return self.finished + sum(self.in_flight.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.done}/{self.total} images ({pct:.0f}%)  {rate:.1f} images/s  "
                f"ETA {duration(eta)}  failed {self.failed}")

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.live:
            if force or now - self._last >= 0.2:
                self.stream.write("\r" + self.line().ljust(78))
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= self.interval:
            self.stream.write("progress: " + self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        self.tick(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def duration(seconds: float) -> str:
    """``seconds`` as m:ss, or h:mm:ss from an hour; "--" when unknown (NaN or infinite)."""
    if seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
