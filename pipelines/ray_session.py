"""The Ray runtime a job runs on: joined when an address is given (a flag, or ``RAY_ADDRESS`` as
``ray job submit`` sets it), else embedded and stopped after. Each says what it does before it waits."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

from featcache.errors import UsageError
from featcache.log import LogStream


@contextmanager
def ray_session(address: str | None = None, stream=None, log_to_driver: bool = False):
    """Join the cluster at ``address`` ("auto", "ray://host:port", "host:port") or, when it is None, at
    ``RAY_ADDRESS``; with neither, start an embedded local Ray sized to this machine (a private one,
    even beside a cluster that ``ray start`` left running here) and stop it afterwards. One line on
    ``stream`` (stderr) says which, before Ray is reached. A runtime the caller already started is used
    as it is. ``log_to_driver``: the workers' output is printed here (a training job's progress lines)."""
    import ray

    if ray.is_initialized():  # a caller (e.g. a notebook or a test session) owns the Ray runtime
        yield
        return
    address, note = resolve_address(address)
    print(note, file=stream or LogStream(), flush=True)
    with _token_auth(embedded=address is None):
        try:
            ray.init(**{**_init_options(address), "log_to_driver": log_to_driver})
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a local Ray"
            raise UsageError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}") from None
        main = threading.current_thread() is threading.main_thread()  # only it may set a handler
        before = signal.signal(signal.SIGTERM, _terminate) if main else None  # in place of ray.init's sys.exit(15)
        try:
            yield
        finally:
            ray.shutdown()
            if main:
                signal.signal(signal.SIGTERM, before)


class Terminated(BaseException):
    """A SIGTERM while Ray runs: unwinds like Ctrl-C's KeyboardInterrupt (no ``except Exception``
    stops it; Ray is shut down on the way out), then the command exits 143 (128 + SIGTERM)."""


def _terminate(signum, frame):
    raise Terminated()


@contextmanager
def _token_auth(embedded: bool):
    """While an embedded runtime starts, Ray's notice that it turned token authentication on by
    default (a warning on every job) is not shown; authentication itself stays as Ray sets it. The
    filter is on Ray's one module logger and is removed afterwards."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _DropMessage("Token authentication is enabled for this Ray cluster")
    if embedded:
        logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def resolve_address(address: str | None) -> tuple[str | None, str]:
    """(the cluster address to join, None for an embedded Ray; the line that tells the user). Without
    a flag, ``RAY_ADDRESS`` is joined as if it were given: Ray itself would connect to it anyway, and
    refuse the embedded runtime's sizing ("num_cpus and num_gpus must not be provided")."""
    if address:
        return address, f"joining the Ray cluster at {address}…"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "local":  # "local" is Ray's word for a new local runtime: the embedded one
        return env, f"joining the Ray cluster at {env} (RAY_ADDRESS)…"
    note = f"starting Ray (embedded, {os.cpu_count()} CPUs)…"
    running = _running_cluster()
    if running:
        note = (f"starting Ray (embedded, {os.cpu_count()} CPUs; not joining the Ray cluster at {running} that "
                "`ray start` left on this machine: --ray-address auto joins it)…")
    return None, note


def _running_cluster() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine (what a bare
    ``ray.init()`` would join), if its address file is there. Ray's own reader (a private module):
    a Ray that moved it only loses the cluster's name from the note."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return None
    return find_bootstrap_address(None)


def _init_options(address: str | None) -> dict:
    """``ray.init`` arguments: a cluster's address, or the embedded runtime's size; quiet either way."""
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if address:
        return dict(address=address, **quiet)
    # "local": a private runtime even when `ray start` left a cluster here (a bare ray.init() joins that
    # one, then refuses num_cpus). Ray lowers its workers' priority (niceness 15) by default; here they are the job.
    return dict(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                _system_config={"worker_niceness": 0}, **quiet)
