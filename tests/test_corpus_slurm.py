"""``gptforge corpus build --executor slurm`` on the local two-node SLURM cluster (tests/slurm/cluster.sh,
started by tests/run.sh): one job array per stage chained by afterok, the same output as a local build,
and a rerun submits nothing."""

import os
import pathlib

import pytest

from test_corpus import corpus, inputs, write_config  # noqa: F401 (inputs is a fixture)

SLURM_CONF = os.environ.get("GPTFORGE_SLURM_CONF")
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not SLURM_CONF, reason="no local SLURM cluster (tests/run.sh starts one)")]


def shards(out: pathlib.Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".jsonl.zst")}


def test_slurm_arrays_build_the_same_corpus(inputs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", SLURM_CONF)
    common = dict(mlflow={"enabled": False})
    local = write_config(tmp_path / "local.yaml", inputs, tmp_path / "local", **common)
    proc = corpus("build", "--config", local, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    slurm = write_config(tmp_path / "slurm.yaml", inputs, tmp_path / "slurm", **common,
                         executor={"kind": "slurm", "slurm": {"time": "00:10:00"}})
    proc = corpus("build", "--config", slurm, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    for stage, tasks in (("filter", 4), ("signatures", 4), ("cluster", 1), ("write", 4), ("report", 1)):
        assert f"stage {stage}: submitted job" in proc.stdout and f"({tasks} array task(s))" in proc.stdout
    logs = os.listdir(tmp_path / "slurm" / "_work" / "slurm" / "logs")
    assert len([n for n in logs if n.startswith("filter_")]) == 4
    assert shards(tmp_path / "slurm") == shards(tmp_path / "local")
    assert (tmp_path / "slurm" / "report.json").is_file()
    proc = corpus("build", "--config", slurm, "--quiet")  # everything done: nothing is submitted
    assert proc.returncode == 0 and "submitted job" not in proc.stdout
    assert proc.stdout.count("all tasks already done, not submitted") == 5
