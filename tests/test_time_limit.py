"""Stops for a time limit and background checkpoint saves, under torchrun with two gloo ranks on the CPU.

SLURM's ``--signal=TERM@...`` reaches each node's torchrun agent (``launcher/run.sh``, through
``launcher/torchrun.py``); the agent forwards it to its ranks at once and kills them ``--shutdown-timeout``
seconds later. In that grace the ranks finish the step, vote to stop, save that step and complete the
checkpoint (a background save too), then exit, and the agent exits 0. Resuming continues the same training exactly: every run here has the same losses as one
uninterrupted run, bit for bit (same ranks, same reduction order: deterministic by construction).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from helpers.corpus import base_config
from helpers.distributed import run_distributed
from helpers.launch import TESTS_DIR, free_port, losses, run_train, train_cmd

pytestmark = pytest.mark.dist

MAX_STEPS = 20
# dropout: an exact resume needs every rank's RNG state restored too
COMMON = {"train": {"max_steps": MAX_STEPS, "eval_interval": 0}, "model": {"preset": "tiny", "dropout": 0.1}}


def job_config(path, run_dir, tokenizer_model, indexed_prefix, **sections) -> str:
    """The tiny two-rank job of these tests (``COMMON``), ``sections`` merged in, as a YAML file."""
    cfg = base_config(run_dir, tokenizer_model, indexed_prefix)
    for section, values in (COMMON | sections).items():
        cfg[section] = cfg.get(section, {}) | values
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_model, indexed_prefix):
    """The losses of one uninterrupted two-rank run (saving synchronously, once at the end)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = job_config(tmp / "ref.yaml", tmp / "run", tokenizer_model, indexed_prefix,
                     checkpoint={"interval": 1000, "async_save": False})
    proc = run_train(cfg, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "complete in" in proc.stdout and "in the background" not in proc.stdout
    return losses(tmp / "run")


def checkpoint_dir_names(run_dir) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def last_logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]  # a line being written
    return json.loads(lines[-1])["step"] if lines else 0


def test_sigterm_to_torchrun_agent_saves_the_step_and_resumes_exactly(reference, tmp_path, tokenizer_model,
                                                                      indexed_prefix):
    run_dir = tmp_path / "run"
    cfg = job_config(tmp_path / "job.yaml", run_dir, tokenizer_model, indexed_prefix,
                     checkpoint={"interval": 1000, "async_save": True})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=TESTS_DIR)
    cmd = train_cmd(cfg, nproc=2)
    at = cmd.index("torch.distributed.run")
    cmd[at:at + 1] = ["gptforge.launcher.torchrun", "--shutdown-timeout", "120"]  # as launcher/run.sh: ample grace
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while last_logged_step(run_dir) < 3 and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.poll() is None, "the run ended before it was signalled"
        # The agent only: the ranks learn of it from the agent (SLURM may signal them too, depending on
        # its process tracking).
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    # The ranks stopped on their own, within the agent's grace: none was killed, and the wrapper turned
    # torchrun's re-raised signal into exit 0.
    assert "forcefully exiting" not in err and "Unable to shutdown" not in err, err[-4000:]
    assert agent.returncode == 0, err[-4000:]
    assert "all 2 local ranks stopped cleanly with their checkpoint complete: exiting 0" in err, err[-4000:]
    assert "SIGTERM received" in out and "stop requested by signal" in out, out[-4000:] + err[-4000:]
    stopped = json.loads((run_dir / "summary.json").read_text())["final_step"]
    assert 3 <= stopped < MAX_STEPS and last_logged_step(run_dir) == stopped
    # Exactly one checkpoint, of the step it stopped at, complete and renamed into place.
    assert checkpoint_dir_names(run_dir) == [f"step_{stopped:08d}"]
    state = json.loads((run_dir / "checkpoints" / f"step_{stopped:08d}" / "trainer_state.json").read_text())
    assert state["step"] == stopped
    assert f"checkpoint {run_dir / 'checkpoints' / f'step_{stopped:08d}'} staged in" in out

    proc = run_train(cfg, "--resume", "auto", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in proc.stdout
    assert losses(run_dir) == reference


# Each worker: rank 0 reports a clean stop on SIGTERM, rank 1 does not (it exits 0 all the same, as a rank
# could that stopped without its checkpoint).
_HALF_STOPPING_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from gptforge.training.callbacks.signals import STOP_REPORT_ENV, stop_marker

    rank, folder = int(os.environ["LOCAL_RANK"]), os.environ[STOP_REPORT_ENV]

    def stop(signum, frame):
        if rank == 0:
            open(stop_marker(folder, rank), "w").close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    with open(os.path.join(sys.argv[1], f"ready{rank}"), "w") as f:
        f.write(folder)
    while True:
        time.sleep(0.05)
""")


def test_sigterm_to_torchrun_agent_fails_unless_every_rank_reports_a_clean_stop(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_HALF_STOPPING_WORKER)
    cmd = [sys.executable, "-m", "gptforge.launcher.torchrun", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "--shutdown-timeout", "60", str(script), str(tmp_path)]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    ready = [tmp_path / f"ready{rank}" for rank in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in ready) and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.poll() is None and all(p.exists() for p in ready), "the workers did not start"
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 1 and "SignalException" in err, err[-4000:]
    assert "1 of 2 local ranks stopped cleanly" in err, err[-4000:]
    assert not os.path.exists(ready[0].read_text())  # the agent's report folder is gone


def test_crash_while_a_background_save_is_written_keeps_the_previous_checkpoint(reference, tmp_path,
                                                                                tokenizer_model, indexed_prefix):
    run_dir = tmp_path / "run"
    # keep_last 1: the step-4 checkpoint may be deleted only once step 8's is complete
    cfg = job_config(tmp_path / "job.yaml", run_dir, tokenizer_model, indexed_prefix,
                     checkpoint={"interval": 4, "keep_last": 1, "async_save": True})
    proc = run_train(cfg, nproc=2, fault="sigkill-mid-write@8")
    assert proc.returncode != 0 and "exitcode  : -9" in proc.stderr, proc.stderr[-4000:]
    names = checkpoint_dir_names(run_dir)
    assert names == [".tmp-step_00000008", "step_00000004"]
    torn = run_dir / "checkpoints" / ".tmp-step_00000008"
    assert not (torn / "trainer_state.json").exists() and not (torn / ".metadata").exists()

    proc = run_train(cfg, "--resume", "auto", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'}" in proc.stdout
    assert checkpoint_dir_names(run_dir) == [f"step_{MAX_STEPS:08d}"]
    assert losses(run_dir) == reference


def _sharded_tensor(rank: int, world_size: int, fill: float):
    """A (4 * world_size, 2) ShardedTensor of two boxes per rank, as a DeepSpeed partition can be: rank r
    holds rows [2r, 2r + 2) and [2 world_size + 2r, ...) filled with ``fill + r``."""
    import torch
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    shards = [Shard(torch.full((2, 2), fill + rank),
                    ShardMetadata(shard_offsets=[row, 0], shard_sizes=[2, 2], placement=f"rank:{rank}/cpu"))
              for row in (2 * rank, 2 * world_size + 2 * rank)]
    return init_from_local_shards(shards, [4 * world_size, 2])


def _background_save_of_shards(rank: int, world_size: int, root: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gptforge.parallel.distributed import DistInfo
    from gptforge.training.checkpoint import BackgroundWriter, begin_checkpoint, is_complete

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    sharded, replicated = distribute_tensor(full, mesh, [Shard(0)]), torch.full((5,), 3.0)
    partition = _sharded_tensor(rank, world_size, 10.0)  # as DeepSpeed's partitions are saved
    info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    writer = BackgroundWriter(info.device)
    path = os.path.join(root, "step_00000001")
    write = begin_checkpoint(path, {"model": {"w": sharded, "b": replicated}, "optim": {"p": partition}},
                             {"step": 1}, info=info, background=writer)
    assert write.background and not is_complete(path)
    # Training goes on: the values change while (or before) the thread writes them.
    sharded.to_local().add_(1000.0)
    replicated.add_(1000.0)
    for shard in partition.local_shards():
        shard.tensor.add_(1000.0)
    times = write.commit()
    assert is_complete(path) and times.background and 0 < times.staged_s <= times.written_s <= times.committed_s
    writer.close()
    target = {"model": {"w": distribute_tensor(torch.zeros(16, 3), mesh, [Shard(0)]), "b": torch.zeros(5)},
              "optim": {"p": _sharded_tensor(rank, world_size, -50.0)}}
    dcp.load(target, checkpoint_id=path)
    # the values when the save began
    assert torch.equal(target["model"]["w"].full_tensor(), full)
    assert torch.equal(target["model"]["b"], torch.full((5,), 3.0))
    assert all(torch.equal(shard.tensor, torch.full((2, 2), 10.0 + rank))
               for shard in target["optim"]["p"].local_shards())
    assert os.path.isfile(os.path.join(path, f"rng_rank{rank}.pt"))


def test_background_save_writes_the_values_it_staged(tmp_path):
    """Two gloo ranks save a sharded DTensor, a ShardedTensor and a replicated tensor in the background,
    change them in place before the write is committed, and read back the values they had when the
    save began."""
    run_distributed(_background_save_of_shards, 2, str(tmp_path))
