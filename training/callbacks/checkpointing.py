"""Checkpoints every ``checkpoint.interval`` steps, after the last step and when a stop was requested.

With ``checkpoint.async_save`` a save only stages the shards and the write goes on behind the next
steps; after each step the ranks check (collectively) whether it finished and complete it. The save of
the last step, or of a stop on a signal, is completed before the loop ends, so the process exits with
it on disk.
"""

from __future__ import annotations

import dataclasses
import os

from ..checkpoint import SaveTimes
from .base import Callback


class Checkpointing(Callback):
    """Runs on every rank (saves and commits are collective); rank 0 logs each checkpoint's times,
    which the summary keeps as ``checkpoint_saves``."""

    def on_step_end(self, trainer, record: dict) -> None:
        step, ckpt = record["step"], trainer.ckpt
        last = step == trainer.t.max_steps or trainer.stop_requested
        if step % trainer.cfg.checkpoint.interval == 0 or last:
            before = len(ckpt.saves)
            trainer.save_checkpoint()  # commits the previous background save first
            if last:
                ckpt.wait()
            self._report(trainer, ckpt.saves[before:])
            if ckpt.pending is not None:
                trainer.log(f"checkpoint {os.path.basename(ckpt.pending.directory)} staged in "
                            f"{ckpt.pending.staged_s:.2f} s, writing in the background")
        else:
            self._report(trainer, [ckpt.poll()])

    def on_train_end(self, trainer, summary: dict) -> None:
        self._report(trainer, [trainer.ckpt.wait()])
        summary["checkpoint_saves"] = [dataclasses.asdict(times) for times in trainer.ckpt.saves]

    def close(self, trainer) -> None:
        trainer.ckpt.close()

    @staticmethod
    def _report(trainer, saves: list[SaveTimes | None]) -> None:
        for t in filter(None, saves):
            if t.background:
                trainer.log(f"checkpoint {t.path} staged in {t.staged_s:.2f} s, written in {t.written_s:.2f} s, "
                            f"complete {t.committed_s:.2f} s after the save began; training waited "
                            f"{t.blocked_s:.2f} s in all")
            else:
                trainer.log(f"checkpoint {t.path} written in {t.written_s:.2f} s, complete in {t.committed_s:.2f} s")
