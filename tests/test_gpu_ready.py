"""The GPU path, checked on CPU: device detection that fails fast, MFU against exact peak tables, the
prefetching loader, device-side metrics, compile against eager, and bench/gpu.sh's CPU mode."""

from __future__ import annotations

import json
import math
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


class CountingSamples:
    """Sample i is the sequence [i, i+1, ...]: a batch says which samples it read."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len, self.reads = seq_len, 0

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        tokens = torch.arange(i, i + self.seq_len)
        return {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(self.seq_len)}


def ramp(tokens: int) -> int:  # a batch-size ramp in tokens, as the schedule's: 4, then 8 sequences
    return 4 if tokens < 64 else 8


def test_prefetching_loader_reads_the_steps_in_order_and_resumes_exactly():
    from gptforge.training.loader import BatchLoader, micro_batches

    seq = 8
    data = CountingSamples(seq)
    kwargs = dict(batch_size=ramp, seq_len=seq, micro=2, dp_rank=1, dp_size=2, device=torch.device("cpu"))

    def walk(loader, start, tokens, steps):
        out = []
        for _ in range(steps):
            b = loader.next(start, tokens)
            want = micro_batches(data, start, b.batch, 2, 1, 2)
            assert b.start == start and b.batch == ramp(tokens)
            for got_mb, want_mb in zip(b.micro_batches, want, strict=True):
                assert all(torch.equal(got_mb[k], want_mb[k]) for k in want_mb)
            assert b.local_tokens.item() == b.batch // 2 * seq
            out.append(b.micro_batches[0]["tokens"][:, 0].tolist())
            start, tokens = start + b.batch, tokens + b.batch * seq
        return out, start, tokens

    straight = BatchLoader(data, **kwargs, depth=3)
    full, _, _ = walk(straight, 0, 0, 6)
    straight.close()
    # rank 1 of 2 reads the second half of each global batch: samples 2.. of the first batch of 4
    assert full[0] == [2, 3] and full[2] == [12, 13]  # step 3 is at sample 8 with the ramp's 8 sequences
    first = BatchLoader(data, **kwargs)
    head, start, tokens = walk(first, 0, 0, 2)
    first.close()  # a run stopped after two steps, resumed at its checkpoint's position
    resumed = BatchLoader(data, **kwargs)
    tail, _, _ = walk(resumed, start, tokens, 4)
    resumed.close()
    assert head + tail == full
    # a position other than the next one read ahead restarts the reader there
    jump = BatchLoader(data, **kwargs)
    assert walk(jump, 0, 0, 1)[0] == full[:1] and walk(jump, 8, 64, 1)[0] == full[2:3]
    jump.close()


def test_loader_hands_the_readers_error_to_the_loop():
    from gptforge.training.loader import BatchLoader

    class Broken:
        def __getitem__(self, i):
            raise IndexError(f"sample {i} is past the end")

    loader = BatchLoader(Broken(), batch_size=lambda tokens: 2, seq_len=4, micro=1, dp_rank=0, dp_size=1,
                         device=torch.device("cpu"))
    with pytest.raises(IndexError, match="sample 0 is past the end"):
        loader.next(0, 0)
    loader.close()


def test_mfu_conventions_and_exact_device_names():
    from gptforge.common.hardware import DEVICES, compute_precision, device_spec
    from gptforge.model.flops import count_parameters, flops_per_token
    from gptforge.model.presets import PRESETS
    from gptforge.model.config import GPTConfig

    cfg = GPTConfig(**PRESETS["gpt3-1.3b"].model)
    counts = count_parameters(cfg)
    n = counts["total"] - counts["position_embedding"]
    assert flops_per_token(cfg, 2048, convention="6n") == 6 * n
    assert flops_per_token(cfg, 2048, convention="6n_attn") == 6 * n + 12 * 24 * 2048 * 2048
    assert flops_per_token(cfg, 2048) == flops_per_token(cfg, 2048, convention="6n_attn")
    with pytest.raises(ValueError, match="convention"):
        flops_per_token(cfg, 2048, convention="7n")

    # the PCIe and NVL parts share the SXM part's prefix but not its peak: exact names only
    sxm, pcie, nvl = (device_spec(f"NVIDIA H100 {s}") for s in ("80GB HBM3", "PCIe", "NVL"))
    assert sxm.peak("bf16") == 989.4e12 and pcie.peak("bf16") == 756.5e12 and nvl.peak("bf16") == 835.5e12
    assert device_spec("NVIDIA H100") is None and device_spec("H100") is None and device_spec(None) is None
    assert device_spec("NVIDIA H200").hbm == 4.8e12 and device_spec("NVIDIA H200 NVL").bf16 == 835.5e12
    assert device_spec("NVIDIA A100-SXM4-40GB").peak("tf32") == 156e12
    assert device_spec("NVIDIA A100 80GB PCIe").peak("fp32") == 19.5e12
    assert device_spec("NVIDIA L40S").peak("fp16") == device_spec("NVIDIA L40S").peak("bf16")
    names = [name for spec in DEVICES for name in spec.names]
    assert len(names) == len(set(names))
    for spec in DEVICES:  # tensor cores: bf16 twice tf32, and tf32 above plain fp32 on every part listed
        assert spec.bf16 == pytest.approx(2 * spec.tf32, rel=0.02) and spec.tf32 > spec.fp32, spec.part
    # MFU of fp32 is taken against the peak its matmuls run at
    assert compute_precision("fp32", tf32=True) == "tf32" and compute_precision("fp32", tf32=False) == "fp32"
    assert compute_precision("bf16", tf32=True) == "bf16"


@NO_CUDA
def test_gpu_bench_script_runs_on_cpu_with_only_torch(tmp_path):
    """bench/gpu.sh's CPU mode, as on a fresh GPU machine's Python: gptforge not installed (the script puts
    the checkout on the path) and neither MLflow, DeepSpeed nor megatron-core importable."""
    blocked = tmp_path / "blocked"
    for name in ("mlflow", "deepspeed", "megatron"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=str(blocked), GPTFORGE_PYTHON=os.sys.executable, OMP_NUM_THREADS="1")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--out", str(out), "--profile", "1"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and json.loads(proc.stdout) == report
    (run,) = report["runs"]
    assert run["preset"] == "tiny" and run["steps"] == 4 and run["intervals"] == 4
    assert run["tokens_per_s"] > 0 and run["step_time_s"] > 0 and run["memory_peak_rss_gib"] > 0
    assert run["mfu_6n"] is None and run["cuda_max_allocated_gib"] is None  # no peak for a CPU
    assert 0 < run["final_loss"] < 2 * math.log(512)  # synthetic tokens over the tiny preset's vocabulary
    assert any("aten::mm" in line or "aten::addmm" in line for line in run["profile_top_ops"])  # the last step's profile


def test_flex_attention_band_is_the_sdpa_band():
    """The mask the CUDA flex-attention path of sparse layers uses is the band SDPA gets (forward; flex
    attention has no CPU backward, and the kernel itself only runs compiled on CUDA)."""
    from torch.nn.attention.flex_attention import create_mask

    from gptforge.model.gpt import banded_causal_mask, banded_mask_mod

    for seq, window in ((32, 8), (64, 1), (40, 64)):
        flex = create_mask(banded_mask_mod(window), None, None, seq, seq, device="cpu")  # [1, 1, T, T]
        assert torch.equal(flex[0, 0], banded_causal_mask(seq, window, torch.device("cpu")))
