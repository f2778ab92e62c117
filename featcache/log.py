"""featcache's messages go through the ``featcache`` logger (a library never prints on its own).

Jobs write their lines to a text stream; when the caller gives none, that stream is a
:class:`LogStream`, which turns each line into an INFO record of the ``featcache`` logger. The CLI
shows INFO on stderr (``--quiet``: warnings and errors only; ``--verbose``: debug too); a Python
caller sees them only if it configures logging, as with any library. A live progress line (a write
starting with a carriage return) goes straight to the terminal, and only while INFO is shown there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

LOGGER = logging.getLogger("featcache")


class LogStream:
    """A write-only text stream whose complete lines become INFO records of the featcache logger."""

    def __init__(self):
        self._pending = ""
        self._live = False  # a progress line is on the terminal, waiting for its newline

    def write(self, text: str) -> int:
        if text.startswith("\r") or (self._live and text == "\n"):
            self._live = text != "\n" and self.isatty()
            if self.isatty() or text == "\n":
                sys.stderr.write(text)
            return len(text)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            LOGGER.info(line)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        """True when the CLI shows INFO on a terminal: then a live progress line is worth drawing."""
        return _CliHandler.installed() and LOGGER.isEnabledFor(logging.INFO) and sys.stderr.isatty()


class _CliHandler(logging.Handler):
    """Each record's message on the process's current stderr (looked up per record, so redirections
    made after set-up, such as a test's capture, are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)

    @staticmethod
    def installed() -> bool:
        return any(isinstance(h, _CliHandler) for h in LOGGER.handlers)


def configure_cli(quiet: bool = False, verbose: bool = False) -> None:
    """The CLI's logging: featcache's messages on stderr, INFO by default (once per process)."""
    LOGGER.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not _CliHandler.installed():
        handler = _CliHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False


# ---- a line for a long wait (issue 23, item 15) ------------------------------------------------------

#: a wait longer than this gets a line saying what it waits for (no command stays silent for 10 s)
NOTICE_AFTER_S = 3.0


@contextlib.contextmanager
def waiting(text: str):
    """Say ``text`` (INFO) once the block has run for :data:`NOTICE_AFTER_S`: a quick block, or a quick
    failure whose one-line error should stand alone, says nothing (at 0 s, it is said at once)."""
    if NOTICE_AFTER_S <= 0:
        LOGGER.info(text)
        yield
        return
    timer = threading.Timer(NOTICE_AFTER_S, LOGGER.info, (text,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
