"""A training callback that records each rank's memory peak of three phases of a run, for bench/memory.py.

Named in ``train.callbacks`` as ``"memory_probe:PeakMemory"`` with ``bench/`` on ``PYTHONPATH``; it writes
``rank<R>.json`` into the folder named by ``GPTFORGE_MEMORY_PROBE_DIR``. The phases are those of the
planner (``parallel/planner.py``):

* ``startup``: process start to ``on_train_start`` (model, optimizer and data built);
* ``accumulation``: from there to the end of the last step, before its checkpoint (user callbacks run
  before the checkpoint decision of the same step);
* ``save``: from there until the last checkpoint's shards are written (``on_checkpoint_written``), or
  to the end of the process if that hook did not run.

Host memory is the peak resident set size (``VmHWM`` in ``/proc/self/status``), reset between phases by
writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later; where that is refused, each phase's
value is the peak of the run so far, and ``reset`` says so). On CUDA ``torch.cuda.max_memory_allocated``
is recorded too, reset with ``torch.cuda.reset_peak_memory_stats``.
"""

from __future__ import annotations

import atexit
import json
import os
import re

from gptforge.training.callbacks import Callback

OUT_ENV = "GPTFORGE_MEMORY_PROBE_DIR"
PHASES = ("startup", "accumulation", "save")


def peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last reset (``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def reset_peak_rss() -> bool:
    """Set the peak resident set size to the current one; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory(Callback):
    def __init__(self) -> None:
        self.out_dir = os.environ[OUT_ENV]
        self.rss: dict[str, int] = {}
        self.cuda: dict[str, int] = {}
        self.reset = True
        self.meta: dict = {}
        self.device = None
        self.max_steps = 0
        self.written = False

    def _close_phase(self, phase: str) -> None:
        self.rss[phase] = peak_rss_bytes()
        self.reset = reset_peak_rss() and self.reset
        if self.device is not None:
            import torch

            self.cuda[phase] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_start(self, trainer) -> None:
        self.device = trainer.info.device if trainer.info.device.type == "cuda" else None
        self.max_steps = trainer.t.max_steps
        self.meta = {"rank": trainer.info.rank, "world_size": trainer.info.world_size,
                     "pp_rank": trainer.mesh["pp"].get_local_rank(), "device": trainer.info.device.type}
        self._close_phase("startup")
        atexit.register(self._write)  # also the end of a run whose last save never reported

    def on_step_end(self, trainer, record: dict) -> None:
        if record["step"] == self.max_steps:
            self._close_phase("accumulation")

    def on_checkpoint_written(self, trainer, tmp_dir: str) -> None:
        if trainer.state.step == self.max_steps and "accumulation" in self.rss:
            self._write()

    def _write(self) -> None:
        if self.written or "accumulation" not in self.rss:
            return
        self._close_phase("save")
        self.written = True
        record = self.meta | {"reset": self.reset, "rss_bytes": self.rss, "cuda_bytes": self.cuda or None}
        path = os.path.join(self.out_dir, f"rank{self.meta['rank']}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(path + ".tmp", path)
