"""Stop on SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption): save and exit."""

from __future__ import annotations

import signal
import time

from ...parallel.distributed import all_reduce_sum
from .base import Callback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(Callback):
    """A signal sets a flag; after each step the ranks vote (a collective, so every rank stops at the
    same step) and ``trainer.stop_requested`` tells the checkpointing callback and the loop. The
    handlers this replaced are put back when training ends.

    The stop must fit in what is left of the job: under torchrun, the agent forwards the signal and
    kills the ranks ``--shutdown-timeout`` seconds later (``launcher/run.sh``). The console says how
    long after the signal the step ended; the checkpoint lines say how long the save took."""

    def __init__(self) -> None:
        self.requested = False
        self.received: tuple[str, float] | None = None
        """The first signal this process got: its name and ``time.monotonic()``."""
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = (signal.Signals(signum).name, time.monotonic())
        self.requested = True

    def on_train_start(self, trainer) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, trainer, record: dict) -> None:
        (votes,) = all_reduce_sum([1.0 if self.requested else 0.0], trainer.info.device)
        if votes > 0 and not trainer.stop_requested:
            trainer.stop_requested = True
            if self.received is not None:
                name, at = self.received
                trainer.log(f"{name} received {time.monotonic() - at:.2f} s before the end of step {record['step']}; "
                            f"saving it and stopping")
            else:
                trainer.log(f"another rank received a stop signal; saving step {record['step']} and stopping")

    def close(self, trainer) -> None:
        for sig, previous in self._previous.items():
            # None: the handler was not set from Python; the default action is the closest one.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
