"""MLflow tracking of a run (rank 0): params once, metrics at the logged steps, config, tokenizer and
the end-of-run artifacts; a resumed job continues the run its checkpoint names."""

from __future__ import annotations

import os

from ...common.atomic import atomic_write_json
from ...common.tracking import Tracker, default_artifact_root, default_tracking_uri
from .base import Callback


class MlflowTracking(Callback):
    def on_train_start(self, trainer) -> None:
        cfg, job = trainer.cfg, trainer.job
        uri = default_tracking_uri(cfg.run.dir, cfg.mlflow.tracking_uri)
        self.tracker = Tracker(tracking_uri=uri, experiment=cfg.mlflow.experiment, run_name=cfg.mlflow.run_name,
                               run_id=trainer.state.mlflow_run_id,
                               artifact_root=default_artifact_root(uri, cfg.run.dir))
        trainer.state.mlflow_run_id = self.tracker.run_id  # saved in checkpoints from now on
        if trainer.resumed_from is None:
            self.tracker.log_params(job.flat_params() | {"derived.n_params": str(trainer.n_params["total"])})
        if cfg.tokenizer is not None:
            self.tracker.log_artifact(os.path.abspath(cfg.tokenizer.path), "tokenizer")
        config_copy = os.path.join(cfg.run.dir, "resolved_config.json")
        atomic_write_json(config_copy, job.flat_params())
        self.tracker.log_artifact(config_copy, "config")
        trainer.log(f"MLflow run {self.tracker.run_id} at {uri}")

    def on_step_end(self, trainer, record: dict) -> None:
        if "loss" in record:  # a log step (Trainer.is_log_step): its figures were read back
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])

    def on_train_end(self, trainer, summary: dict) -> None:
        for folder, path in trainer.artifacts.items():
            self.tracker.log_artifact(path, folder)
        self.tracker.close(status="FINISHED" if trainer.state.step == trainer.t.max_steps else "KILLED")
        summary["mlflow_dropped_calls"] = self.tracker.dropped
