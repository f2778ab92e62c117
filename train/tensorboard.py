"""TensorBoard event files beside ``metrics.jsonl`` (``log.tensorboard = true``): every number of every record
the run appends, under the record's own key, at its step. ``metrics.jsonl`` stays the record of truth; this is a
view of it for the tool most users already have open.

A resumed run's writer purges the events a stopped process logged after its last checkpoint (TensorBoard's own
``purge_step``), so the curves show what ``metrics.jsonl`` keeps, not two versions of the same steps.
"""

from __future__ import annotations

from pathlib import Path

from featcache.errors import UsageError

FOLDER = "tensorboard"  # under the run folder


def check_available() -> None:
    """Refuse ``log.tensorboard`` in one line, before anything is written, when the package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401 (needs the tensorboard package)
    except ImportError:
        raise UsageError("log.tensorboard needs the tensorboard package: pip install 'featcache[tensorboard]' "
                         "(or set log.tensorboard = false)") from None


class TensorBoardLog:
    """Writes the run's records as scalars into ``run/tensorboard``; ``first_step`` > 0 on a resume."""

    def __init__(self, run: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run) / FOLDER), purge_step=first_step + 1 if first_step else None)

    def write(self, step: int, numbers: dict[str, float]) -> None:
        """A record's numbers at ``step``, flushed at once (a killed run keeps what it logged)."""
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
