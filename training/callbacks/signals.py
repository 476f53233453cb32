"""Stop on SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption): save and exit."""

from __future__ import annotations

import signal

from ...parallel.distributed import all_reduce_sum
from .base import Callback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(Callback):
    """A signal sets a flag; after each step the ranks vote (a collective, so every rank stops at the
    same step) and ``trainer.stop_requested`` tells the checkpointing callback and the loop. The
    handlers this replaced are put back when training ends."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_train_start(self, trainer) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, trainer, record: dict) -> None:
        (votes,) = all_reduce_sum([1.0 if self.requested else 0.0], trainer.info.device)
        if votes > 0:
            trainer.stop_requested = True

    def close(self, trainer) -> None:
        for sig, previous in self._previous.items():
            # None: the handler was not set from Python; the default action is the closest one.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
