"""Run ``gptforge`` with one task of the corpus build killed mid-shard by SIGKILL (the resume tests).

``python tests/helpers/corpus_faults.py STAGE SHARD RECORDS ARGS...`` runs ``gptforge ARGS...`` where the
task of ``STAGE`` on shard ``SHARD`` kills its own process once its shard writer holds ``RECORDS``
records: the temporary shard is torn and no completion marker is written. Worker processes are forked
from this one, so they inherit the patch.
"""

from __future__ import annotations

import os
import signal
import sys

from gptforge.data_prep.corpus import stages
from gptforge.data_prep.corpus.shard_writer import ShardWriter
from gptforge.launcher.cli import main


def kill_mid_shard(stage: str, shard: int, records: int) -> None:
    run = stages._RUN[stage]

    def run_and_die(plan, index: int) -> dict:
        if index != shard:
            return run(plan, index)
        write = ShardWriter.write

        def write_or_die(self, record: dict) -> None:
            if self.count == records:
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, record)

        ShardWriter.write = write_or_die
        try:
            return run(plan, index)
        finally:
            ShardWriter.write = write

    stages._RUN[stage] = run_and_die


if __name__ == "__main__":
    kill_mid_shard(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
