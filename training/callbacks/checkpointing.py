"""Checkpoints every ``checkpoint.interval`` steps, after the last step and when a stop was requested."""

from __future__ import annotations

from .base import Callback


class Checkpointing(Callback):
    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if step % trainer.cfg.checkpoint.interval == 0 or step == trainer.t.max_steps or trainer.stop_requested:
            trainer.log(f"checkpoint {trainer.save_checkpoint()}")
