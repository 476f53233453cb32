"""The GPU path, checked on CPU: device detection that fails fast, MFU against exact peak tables, the
prefetching loader, device-side metrics, compile against eager, and bench/gpu.sh's CPU mode."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
import torch

from helpers.launch import config_errors

REPO = pathlib.Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a torch without CUDA")


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """An ``nvidia-smi`` on PATH that lists two H100s, as on a GPU node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 1\n"
                   "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


@NO_CUDA
def test_auto_device_with_gpus_but_a_cpu_torch_is_an_error(fake_gpus):
    from gptforge.common.errors import UserError
    from gptforge.parallel.distributed import nvidia_gpus, resolve_device_kind

    assert nvidia_gpus() == ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"]
    with pytest.raises(UserError, match=r"nvidia-smi lists 2 GPU\(s\).*CPU build.*GPTFORGE_TORCH=cuda.*train.device=cpu"):
        resolve_device_kind("auto")
    with pytest.raises(UserError, match="train.device is 'cuda' but no CUDA device"):
        resolve_device_kind("cuda")
    assert resolve_device_kind("cpu") == "cpu"  # asked for on purpose


@NO_CUDA
def test_auto_device_without_gpus_is_the_cpu(tmp_path, monkeypatch):
    from gptforge.parallel.distributed import nvidia_gpus, resolve_device_kind

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert nvidia_gpus() == []
    assert resolve_device_kind("auto") == "cpu"


@NO_CUDA
def test_device_error_is_collected_with_the_other_config_errors(fake_gpus, write_config):
    errors = config_errors(write_config(), ["train.max_steps=0"])
    assert any("train.max_steps must be >= 1" in e for e in errors)
    assert any("nvidia-smi lists 2 GPU(s)" in e for e in errors)
    assert not any("nvidia-smi" in e for e in config_errors(write_config(), ["train.max_steps=0", "train.device=cpu"]))


@NO_CUDA
def test_run_sh_refuses_one_rank_per_gpu_on_a_cpu_torch(fake_gpus, tmp_path):
    env = dict(os.environ, CONFIG="configs/quickstart.yaml", GPTFORGE_PYTHON=os.sys.executable)
    env.pop("NPROC_PER_NODE", None)
    proc = subprocess.run(["bash", str(REPO / "launcher" / "run.sh")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "this node has 2 GPU(s)" in proc.stderr and "GPTFORGE_TORCH=cuda" in proc.stderr
    assert "rendezvous" not in proc.stdout  # refused before anything started
