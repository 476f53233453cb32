"""Stop on SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption): save and exit."""

from __future__ import annotations

import json
import os
import signal
import time

from ...common.atomic import atomic_write_text
from ...parallel.distributed import LaggedSum
from ..checkpoint import is_complete
from .base import Callback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_REPORT_ENV = "GPTFORGE_STOP_REPORT_DIR"
"""Set by ``launcher/torchrun.py`` for its ranks: a folder where each rank that stopped cleanly after a
signal writes ``rank<LOCAL_RANK>.stopped``, so the agent can exit 0 after it forwarded the signal."""


def stop_marker(folder: str, local_rank: int) -> str:
    return os.path.join(folder, f"rank{local_rank}.stopped")


class StopOnSignal(Callback):
    """A signal sets a flag; after each step the ranks vote and ``trainer.stop_requested`` tells the
    checkpointing callback and the loop. The vote never holds up a step: each step posts its flag and
    reads the previous step's sum (``LaggedSum``), so every rank stops at the same step, the one after the
    signal was seen. The handlers this replaced are put back when training ends.

    The stop must fit in what is left of the job: under torchrun, the agent forwards the signal and
    kills the ranks ``--shutdown-timeout`` seconds later (``launcher/run.sh``). The console says how
    long after the signal the step ended; the checkpoint lines say how long the save took.

    Under ``launcher/torchrun.py`` (``STOP_REPORT_ENV`` set) a rank whose training ended on a stop, with the
    checkpoint of its last step complete, writes its stop marker there when it closes."""

    def __init__(self) -> None:
        self.requested = False
        self.received: tuple[str, float] | None = None
        """The first signal this process got: its name and ``time.monotonic()``."""
        self._previous: dict[int, object] = {}
        self._ended = False
        """``on_train_end`` ran: every hook before this callback's finished without raising."""

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = (signal.Signals(signum).name, time.monotonic())
        self.requested = True

    def on_train_start(self, trainer) -> None:
        self.vote = LaggedSum()
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, trainer, record: dict) -> None:
        votes = self.vote.post([1.0 if self.requested else 0.0])
        if votes is not None and votes[0] > 0 and not trainer.stop_requested:
            trainer.stop_requested = True
            if self.received is not None:
                name, at = self.received
                trainer.log(f"{name} received {time.monotonic() - at:.2f} s before the end of step {record['step']}; "
                            f"saving it and stopping")
            else:
                trainer.log(f"another rank received a stop signal; saving step {record['step']} and stopping")

    def on_train_end(self, trainer, summary: dict) -> None:
        self.vote.collect()  # the last step's vote, still in flight on every rank
        self._ended = True

    def close(self, trainer) -> None:
        for sig, previous in self._previous.items():
            # None: the handler was not set from Python; the default action is the closest one.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._report_stop(trainer)

    def _report_stop(self, trainer) -> None:
        """The stop marker, once the stop's checkpoint is committed. ``close`` runs after every
        ``on_train_end``, also when one raised: the checkpointing callback's (after this one) commits the
        last save, so a save still pending, or no complete folder of the final step, means it failed."""
        folder = os.environ.get(STOP_REPORT_ENV)
        if not (folder and self._ended and trainer.stop_requested and trainer.ckpt.pending is None):
            return
        step = trainer.state.step
        if not is_complete(os.path.join(trainer.ckpt.dir, f"step_{step:08d}")):
            return
        signal_name = self.received[0] if self.received is not None else None  # None: the stop was another rank's
        atomic_write_text(stop_marker(folder, trainer.info.local_rank),
                          json.dumps({"step": step, "signal": signal_name}) + "\n")
