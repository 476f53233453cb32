"""Validation loss every ``train.eval_interval`` steps and after the last step."""

from __future__ import annotations

import math

from ..steps import evaluate
from .base import Callback


class Validation(Callback):
    """Adds ``val_loss`` and ``val_ppl`` to the step's record (every rank runs the forwards: sharded
    parameters are gathered collectively) and keeps the latest loss in ``trainer.val_loss``."""

    def on_step_end(self, trainer, record: dict) -> None:
        t, step = trainer.t, record["step"]
        if t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.max_steps):
            val_loss = evaluate(trainer.ctx, trainer.datasets.valid, t.eval_samples, t.micro_batch_size,
                                trainer.dp_rank)
            record["val_loss"] = val_loss
            record["val_ppl"] = math.exp(min(val_loss, 50.0))  # capped: an early loss may overflow exp
            trainer.val_loss = val_loss
