"""The Ray runtime a job runs on: joined when an address is given, else embedded and stopped after."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from featcache.errors import UsageError


@contextmanager
def ray_session(address: str | None = None):
    """Join the cluster at ``address`` ("auto", "ray://host:port", "host:port"), or start an embedded
    local Ray sized to this machine and stop it afterwards. A runtime the caller already started is used
    as it is."""
    import ray

    if ray.is_initialized():  # a caller (e.g. a notebook or a test session) owns the Ray runtime
        yield
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # Ray lowers its workers' priority (niceness 15) by default; here the workers are the job.
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _system_config={"worker_niceness": 0},
                     **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        raise UsageError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()
