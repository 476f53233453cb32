"""``sbatch launcher/run.sh`` on a real two-node SLURM cluster (tests/slurm/cluster.sh, started by tests/run.sh).

Skipped only when no cluster was started (GPTFORGE_SLURM_CONF unset, e.g. pytest run by hand as non-root);
tests/run.sh always starts one, so CI runs these.
"""

import json
import os
import pathlib
import subprocess

import pytest

from helpers.launch import losses, run_train

REPO = pathlib.Path(__file__).resolve().parents[1]
SLURM_CONF = os.environ.get("GPTFORGE_SLURM_CONF")
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not SLURM_CONF, reason="no local SLURM cluster (tests/run.sh starts one)")]


def sbatch(config: str, out_dir, *overrides: str, nodes: int = 2) -> str:
    env = dict(os.environ, SLURM_CONF=SLURM_CONF, CONFIG=config, NPROC_PER_NODE="1",
               GPTFORGE_PYTHON=str(pathlib.Path(os.sys.executable)))
    out = out_dir / "slurm-%j.out"
    proc = subprocess.run(["sbatch", "-N", str(nodes), "--wait", f"--output={out}", str(REPO / "launcher" / "run.sh"),
                           *overrides], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(out_dir.glob("slurm-*.out")))
    assert proc.returncode == 0, proc.stderr + logs[-4000:]
    return logs


def test_two_node_job_matches_one_process_and_resumes(tmp_path, write_config):
    reference, cluster = tmp_path / "reference", tmp_path / "cluster"
    common = dict(train={"max_steps": 6, "eval_interval": 3, "global_batch_size": 4, "micro_batch_size": 2},
                  checkpoint={"interval": 2, "keep_last": 3})
    proc = run_train(write_config("ref.yaml", run_dir=reference, **common))
    assert proc.returncode == 0, proc.stderr
    cfg = write_config("cluster.yaml", run_dir=cluster, **common)

    logs_dir = tmp_path / "logs1"
    logs_dir.mkdir()
    logs = sbatch(cfg, logs_dir, "train.max_steps=4")  # a job that stops early ...
    assert "2 node(s) x 1 rank(s)" in logs and "2 rank(s) on cpu" in logs
    assert sorted(os.listdir(cluster / "checkpoints")) == ["step_00000002", "step_00000004"]

    logs_dir = tmp_path / "logs2"
    logs_dir.mkdir()
    logs = sbatch(cfg, logs_dir)  # ... and its resubmission continues from the newest checkpoint
    assert "resumed from" in logs and "step_00000004" in logs
    want, got = losses(reference), losses(cluster)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6)
    summary = json.loads((cluster / "summary.json").read_text())
    assert summary["final_step"] == 6 and summary["start_step"] == 4
