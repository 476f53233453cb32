"""``train.profile_steps``: a ``torch.profiler`` trace of a few steps after the warm-up, per rank."""

from __future__ import annotations

import os

import torch

from .base import Callback


class Profiling(Callback):
    """Profiles steps ``profile_after + 1`` ... ``profile_after + profile_steps`` of this process (one more
    step before them warms the profiler up) and writes ``<run.dir>/profile/rank<r>.trace.json`` (Chrome
    trace: chrome://tracing or Perfetto) and ``rank<r>.ops.txt``, the operators by total device time (CPU
    time on the CPU)."""

    def on_train_start(self, trainer) -> None:
        t = trainer.t
        self.folder = os.path.join(trainer.cfg.run.dir, "profile")
        activities = [torch.profiler.ProfilerActivity.CPU]
        self.cuda = trainer.info.device.type == "cuda"
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=True,
            schedule=torch.profiler.schedule(wait=max(0, t.profile_after - 1), warmup=1 if t.profile_after else 0,
                                             active=t.profile_steps, repeat=1),
            on_trace_ready=self._write)
        self.rank = trainer.info.rank
        self.profiler.start()

    def _write(self, prof) -> None:
        os.makedirs(self.folder, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.folder, f"rank{self.rank}.trace.json"))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        with open(os.path.join(self.folder, f"rank{self.rank}.ops.txt"), "w") as handle:
            handle.write(prof.key_averages().table(sort_by=key, row_limit=30) + "\n")

    def on_step_end(self, trainer, record: dict) -> None:
        self.profiler.step()

    def close(self, trainer) -> None:
        if getattr(self, "profiler", None) is not None:
            self.profiler.stop()
            self.profiler = None
