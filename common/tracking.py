"""MLflow tracking that never stops the work it tracks (training, fine-tuning, evaluation, corpus reports).

In training, rank 0 only. Calls are queued and sent by a background thread with retries; a tracking server that is
down or slow costs a warning and the dropped calls are counted, never a crash or a stalled step.
The embedded default is a sqlite store under the run directory; ``MLFLOW_TRACKING_URI`` selects a server.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from typing import Any, Callable

# How long the reachability check of an http(s) server waits for an answer.
REQUEST_TIMEOUT = 10


def default_tracking_uri(run_dir: str, configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.abspath(os.path.join(run_dir, "mlflow.db"))


def default_artifact_root(tracking_uri: str, run_dir: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``run_dir/mlartifacts`` with a sqlite store (MLflow
    would use the current directory); None otherwise (a server keeps them in its own artifact store)."""
    return os.path.join(run_dir, "mlartifacts") if tracking_uri.startswith("sqlite:") else None


def check_reachable(tracking_uri: str) -> None:
    """Raise ``OSError`` within ``REQUEST_TIMEOUT`` seconds when an http(s) tracking server does not answer.

    MLflow's client retries a refused connection with backoff for minutes before failing, and its request
    settings are process-wide environment variables, which the Tracker leaves alone: this check is what
    makes a server that is down at the start cost seconds. A server that goes down later only slows the
    background thread (``close`` gives up flushing after its timeout)."""
    if tracking_uri.split(":", 1)[0].lower() in ("http", "https"):
        import urllib.request

        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=REQUEST_TIMEOUT).close()


class Tracker:
    """Queue of MLflow calls for one run, sent in order by a daemon thread."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str | None, run_id: str | None,
                 artifact_root: str | None, retries: int = 3, retry_wait: float = 1.0) -> None:
        self.tracking_uri = tracking_uri
        self.retries = retries
        self.retry_wait = retry_wait
        self.dropped = 0
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        # Run creation is synchronous: the id goes into checkpoints so a resumed job continues the run.
        self._call(lambda: self._open(experiment, run_name, run_id, artifact_root), "start run")
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def _open(self, experiment: str, run_name: str | None, run_id: str | None, artifact_root: str | None) -> None:
        from mlflow.tracking import MlflowClient

        check_reachable(self.tracking_uri)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                exp_id = found.experiment_id
            else:
                location = None
                if artifact_root is not None:
                    location = "file://" + os.path.abspath(artifact_root)
                exp_id = client.create_experiment(experiment, artifact_location=location)
            self.run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        self._client = client

    def _call(self, fn: Callable[[], Any], what: str) -> bool:
        for attempt in range(self.retries):
            try:
                fn()
                return True
            except Exception as err:  # any tracking failure: warn, retry, keep training
                if attempt == self.retries - 1:
                    self.dropped += 1
                    warnings.warn(f"MLflow {what} failed after {self.retries} tries ({err.__class__.__name__}: "
                                  f"{str(err)[:200]}); training continues")
                    return False
                time.sleep(self.retry_wait * (2**attempt))
        return False

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            fn, what = item
            if self._client is not None and self.run_id is not None:
                self._call(fn, what)
            else:
                self.dropped += 1
            self._queue.task_done()

    def _submit(self, fn: Callable[[], Any], what: str) -> None:
        self._queue.put((fn, what))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            chunk = items[i : i + 100]
            self._submit(lambda c=chunk: self._client.log_batch(self.run_id, params=c), "log params")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._submit(lambda: self._client.log_batch(self.run_id, metrics=items), "log metrics")

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._submit(lambda: self._client.log_artifact(self.run_id, path, artifact_path), f"log artifact {path}")

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        """Send what is queued (up to ``timeout`` seconds), then mark the run ``status``."""
        self._submit(lambda: self._client.set_terminated(self.run_id, status=status), "end run")
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(f"MLflow: gave up flushing after {timeout:.0f}s; {self._queue.qsize()} calls not sent")
        if self.dropped:
            warnings.warn(f"MLflow: {self.dropped} tracking calls were dropped; see warnings above")
