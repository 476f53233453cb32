"""Training callbacks for the tests, named in ``train.callbacks`` (the run needs ``tests/`` on its path).

``FaultInjection`` reads ``GPTFORGE_TEST_TRAIN_FAULT=KIND@STEP``: ``sigkill`` (the process kills itself
after that step, before any checkpoint of it), ``sigterm`` (as SLURM does before a time limit) or
``sigkill-in-save`` (dies inside that step's checkpoint save, once every rank's shards are written and
before the checkpoint is renamed into place). ``StepCounter`` records the hooks it sees.
"""

from __future__ import annotations

import os
import signal

from gptforge.training.callbacks import Callback

FAULT_ENV = "GPTFORGE_TEST_TRAIN_FAULT"
KINDS = ("sigkill", "sigterm", "sigkill-in-save")


class FaultInjection(Callback):
    def __init__(self) -> None:
        kind, _, at = os.environ[FAULT_ENV].partition("@")
        if kind not in KINDS or not at.isdigit():
            raise ValueError(f"{FAULT_ENV}={os.environ[FAULT_ENV]!r}: expected KIND@STEP, KIND one of {KINDS}")
        self.kind, self.step = kind, int(at)

    def on_step_end(self, trainer, record: dict) -> None:
        if record["step"] == self.step and self.kind in ("sigkill", "sigterm"):
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "sigkill" else signal.SIGTERM)

    def on_checkpoint_written(self, trainer, tmp_dir: str) -> None:
        if self.kind == "sigkill-in-save" and trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepCounter(Callback):
    """Appends one line per hook call to ``<run.dir>/hooks.txt`` (rank 0): ``start``, ``step N``,
    ``checkpoint N``, ``end N``."""

    def _write(self, trainer, line: str) -> None:
        if trainer.info.is_main:
            with open(os.path.join(trainer.cfg.run.dir, "hooks.txt"), "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def on_train_start(self, trainer) -> None:
        self._write(trainer, "start")

    def on_step_end(self, trainer, record: dict) -> None:
        self._write(trainer, f"step {record['step']}")

    def on_checkpoint_written(self, trainer, tmp_dir: str) -> None:
        self._write(trainer, f"checkpoint {trainer.state.step}")

    def on_train_end(self, trainer, summary: dict) -> None:
        self._write(trainer, f"end {summary['final_step']}")
