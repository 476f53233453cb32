"""``<run.dir>/metrics.jsonl``: one JSON record per logged step (rank 0; ``Trainer.is_log_step``)."""

from __future__ import annotations

import os

from ..metrics import MetricsLog
from .base import Callback


class MetricsFile(Callback):
    def on_train_start(self, trainer) -> None:
        # Opened at the resumed step: records a killed run wrote after its last checkpoint are dropped.
        self.log = MetricsLog(os.path.join(trainer.cfg.run.dir, "metrics.jsonl"), trainer.state.step)

    def on_step_end(self, trainer, record: dict) -> None:
        if "loss" in record:
            self.log.append(record)
