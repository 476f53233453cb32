"""Training callbacks for the tests, named in ``train.callbacks`` (the run needs ``tests/`` on its path).

``FaultInjection`` reads ``GPTFORGE_TEST_TRAIN_FAULT=KIND@STEP``: ``sigkill`` (the process kills itself
after that step, before any checkpoint of it, once the checkpoints of earlier steps are complete: a
background save would otherwise be lost or not depending on how fast it was written), ``sigterm`` (as
SLURM does before a time limit), ``sigkill-in-save`` (dies inside that step's checkpoint save, once every
rank's shards are written and before the checkpoint is renamed into place) or ``sigkill-mid-write``
(dies while the first checkpoint saved at or after that step is being written, once one item of it is
on disk: in the writer thread of a background save, while training goes on; earlier checkpoints are
complete first). ``StepCounter`` records
the hooks it sees.
"""

from __future__ import annotations

import os
import signal

from gptforge.training.callbacks import Callback

FAULT_ENV = "GPTFORGE_TEST_TRAIN_FAULT"
KINDS = ("sigkill", "sigterm", "sigkill-in-save", "sigkill-mid-write")


def _step_of(tmp_dir: str) -> int:
    from gptforge.training.checkpoint import checkpoint_step  # here: importing this module stays light

    return checkpoint_step(tmp_dir)


def _die_after_first_item() -> None:
    """Make DCP's file writer kill this process right after it wrote one item (tensor or bytes)."""
    from torch.distributed.checkpoint import filesystem

    write_item = filesystem._write_item

    def write_then_die(*args, **kwargs):
        result = write_item(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    filesystem._write_item = write_then_die


class FaultInjection(Callback):
    def __init__(self) -> None:
        kind, _, at = os.environ[FAULT_ENV].partition("@")
        if kind not in KINDS or not at.isdigit():
            raise ValueError(f"{FAULT_ENV}={os.environ[FAULT_ENV]!r}: expected KIND@STEP, KIND one of {KINDS}")
        self.kind, self.step = kind, int(at)

    def on_step_end(self, trainer, record: dict) -> None:
        if record["step"] != self.step:
            return
        if self.kind in ("sigkill", "sigkill-mid-write"):
            trainer.ckpt.wait()  # earlier saves complete (collective: every rank runs this hook here)
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "sigkill-mid-write":  # a save of this step starts after this hook
            _die_after_first_item()

    def on_checkpoint_written(self, trainer, tmp_dir: str) -> None:
        # With background saves this runs when the checkpoint is committed, possibly some steps after
        # its own: its step is the folder's.
        if self.kind == "sigkill-in-save" and _step_of(tmp_dir) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepCounter(Callback):
    """Appends one line per hook call to ``<run.dir>/hooks.txt`` (rank 0): ``start``, ``step N``,
    ``checkpoint N`` (N: the step the checkpoint is of, when it is committed), ``end N``."""

    def _write(self, trainer, line: str) -> None:
        if trainer.info.is_main:
            with open(os.path.join(trainer.cfg.run.dir, "hooks.txt"), "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def on_train_start(self, trainer) -> None:
        self._write(trainer, "start")

    def on_step_end(self, trainer, record: dict) -> None:
        self._write(trainer, f"step {record['step']}")

    def on_checkpoint_written(self, trainer, tmp_dir: str) -> None:
        self._write(trainer, f"checkpoint {_step_of(tmp_dir)}")

    def on_train_end(self, trainer, summary: dict) -> None:
        self._write(trainer, f"end {summary['final_step']}")
