"""Weights & Biases logging (``log.wandb = {project = ...}``): every number of every record the run appends to
``metrics.jsonl``, at its step, into a W&B run whose files live under ``RUN/wandb``. ``metrics.jsonl`` stays the
record of truth.

The mode is ``mode`` when given, else ``WANDB_MODE``, else online when W&B credentials are there
(``WANDB_API_KEY``, or a ``~/.netrc`` entry for W&B) and offline otherwise: a machine without an account or
without a network still gets a run folder that ``wandb sync RUN/wandb/offline-run-*`` uploads later. The run's id
is kept in ``RUN/wandb/run-id`` so that ``--resume`` continues the same W&B run. No credential is ever read into
the config W&B records (the run's resolved config is what ``config.toml`` holds).
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from featcache.errors import UsageError

FOLDER = "wandb"  # under the run folder
KEYS = ("project", "entity", "name", "group", "tags", "mode")
MODES = ("online", "offline", "disabled")


def check(settings: dict) -> None:
    """One line for a setting W&B would refuse later, or for a missing package, before anything is written."""
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise UsageError(f"log.wandb: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    if not settings.get("project"):
        raise UsageError("log.wandb needs a project: log.wandb = {project = \"...\"}")
    mode = settings.get("mode")
    if mode is not None and mode not in MODES:
        raise UsageError(f"log.wandb mode must be 'online', 'offline' or 'disabled', not {mode!r}")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError("log.wandb needs the wandb package: pip install 'featcache[wandb]' (or remove log.wandb)") \
            from None


def _mode(settings: dict) -> str:
    explicit = settings.get("mode") or os.environ.get("WANDB_MODE")
    return explicit or ("online" if _credentials() else "offline")


def _credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class WandbLog:
    """A W&B run for the training run in ``run`` (``config``: its resolved config as a dict)."""

    def __init__(self, run: Path, settings: dict, config: dict):
        import wandb

        folder = Path(run) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run-id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8) + "\n")
        self.run = wandb.init(project=settings["project"], entity=settings.get("entity"), name=settings.get("name"),
                              group=settings.get("group"), tags=settings.get("tags"), dir=str(run),
                              id=id_file.read_text().strip(), resume="allow", config=config, mode=_mode(settings),
                              settings=wandb.Settings(silent=True, console="off"))

    def write(self, step: int, numbers: dict[str, float]) -> None:
        """A record's numbers at ``step``."""
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()
