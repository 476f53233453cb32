"""``python -m gptforge.launcher.torchrun <torchrun arguments>``: torchrun, except after a clean stop on a signal.

torchrun's agent forwards a SIGTERM (what SLURM sends before a time limit) to its ranks, waits for them,
then re-raises it as ``SignalException`` and exits 1 however they ended, so a job that saved and
stopped cleanly ends FAILED and its ``afterok`` dependents never start. This wrapper runs
``torch.distributed.run.main`` unchanged and exits 0 instead only when every local rank of this agent
reported that it stopped after a signal with the checkpoint of its last step complete (the stop markers
of ``training/callbacks/signals.py``); any other end is torchrun's own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException

from ..training.callbacks.signals import STOP_REPORT_ENV, stop_marker


def local_world_size(argv: list[str]) -> int:
    """The ranks this agent starts: ``--nproc-per-node`` as torchrun reads it (a number, or ``gpu``,
    ``auto``, ...; also from ``PET_NPROC_PER_NODE``)."""
    return torchrun.determine_local_world_size(torchrun.parse_args(argv).nproc_per_node)


def stopped_ranks(folder: str, nproc: int) -> list[int]:
    """The local ranks in ``[0, nproc)`` whose stop marker is in ``folder``."""
    return [rank for rank in range(nproc) if os.path.isfile(stop_marker(folder, rank))]


def main(argv: list[str]) -> int:
    folder = tempfile.mkdtemp(prefix="gptforge-stop-")
    # the ranks inherit the agent's environment
    os.environ[STOP_REPORT_ENV] = folder
    try:
        try:
            torchrun.main(argv)
        except SignalException as err:
            nproc = local_world_size(argv)
            stopped = stopped_ranks(folder, nproc)
            if len(stopped) != nproc:
                print(f"gptforge: {err.sigval.name} received; {len(stopped)} of {nproc} local ranks stopped "
                      f"cleanly with their checkpoint complete: exiting as torchrun does", file=sys.stderr)
                raise
            print(f"gptforge: {err.sigval.name} received; all {nproc} local ranks stopped cleanly with their "
                  f"checkpoint complete: exiting 0", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
