"""Training throughput and MFU of `gptforge train` on one GPU, as users run it (``bench/gpu.sh`` calls this).

For each preset: the largest micro-batch whose planned peak (``gptforge plan``) fits the device, then
``gptforge train`` on synthetic tokens (``data.mock``) at bf16, seq 2048, blocks compiled, no
checkpoints, logging every few steps. The figures are the median of the log intervals after the first
(which holds compilation): tokens/s, MFU in both conventions (6N, 6N + 12·L·d·T), step time, and the
CUDA allocator's peaks. A run that runs out of memory is retried at half the micro-batch.

Without CUDA it trains the ``tiny`` preset briefly on the CPU (a check that the script runs, with no
MFU): ``tests/test_gpu_ready.py`` runs that mode, so the script is ready for the first GPU.

    python bench/gpu_train.py [--presets gpt3-125m,gpt3-1.3b] [--steps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

GPTFORGE = [sys.executable, "-m", "gptforge.launcher.cli"]


def largest_micro_batch(preset: str, seq_len: int, gpu_memory_gib: float, accumulation: int) -> int:
    """The largest power-of-two micro-batch (<= 64) whose planned peaks fit ``gpu_memory_gib``."""
    from gptforge.parallel.plan_cli import plan_rows

    for micro in (64, 32, 16, 8, 4, 2, 1):
        row = plan_rows([preset], micro_batch=micro, seq_len=seq_len, precision="bf16",
                        gpu_memory_gib=gpu_memory_gib, global_batch=micro * accumulation)[0]
        if row["fits"]:
            return micro
    return 1


def config(run_dir: str, preset: str, *, seq_len: int, micro: int, accumulation: int, steps: int,
           log_interval: int, precision: str, compile_: bool | str, profile: int = 0) -> dict:
    return {
        "run": {"dir": run_dir},
        "model": {"preset": preset},
        "data": {"mock": True, "seed": 1234},
        "train": {"max_steps": steps, "global_batch_size": micro * accumulation, "micro_batch_size": micro,
                  "seq_len": seq_len, "precision": precision, "compile": compile_, "log_interval": log_interval,
                  "eval_interval": 0, "sample_tokens": 0, "profile_steps": profile, "profile_after": 3},
        # a fixed lr (no warmup or ramp): the schedule does not change the work of a step
        "optim": {"warmup_tokens": 0, "batch_ramp_tokens": 0, "lr": 1e-4},
        "checkpoint": {"enabled": False},
        "mlflow": {"enabled": False},
    }


def run_one(preset: str, *, seq_len: int, micro: int, accumulation: int, steps: int, log_interval: int,
            precision: str, compile_, workdir: str, timeout: float, profile: int = 0) -> dict:
    run_dir = os.path.join(workdir, f"{preset}-mb{micro}")
    cfg_path = run_dir + ".yaml"
    with open(cfg_path, "w") as handle:
        yaml.safe_dump(config(run_dir, preset, seq_len=seq_len, micro=micro, accumulation=accumulation, steps=steps,
                              log_interval=log_interval, precision=precision, compile_=compile_, profile=profile),
                       handle)
    command = GPTFORGE + ["train", "--config", cfg_path]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    result = {"preset": preset, "micro_batch": micro, "global_batch": micro * accumulation, "seq_len": seq_len,
              "precision": precision, "compile": compile_, "steps": steps, "wall_s": round(wall, 1),
              "command": " ".join(["gptforge", "train", "--config", os.path.basename(cfg_path)])}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        result |= {"error": "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else tail}
        return result
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = records[1:] or records  # the first interval holds compilation and warm-up
    pick = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else None  # noqa: E731
    result |= {"tokens_per_s": pick("tokens_per_s"), "step_time_s": pick("step_time_s"),
               "mfu_6n": pick("mfu_6n"), "mfu_6n_attn": pick("mfu_6n_attn"),
               "cuda_max_allocated_gib": records[-1].get("cuda_max_allocated_gib"),
               "cuda_max_reserved_gib": records[-1].get("cuda_max_reserved_gib"),
               "memory_peak_rss_gib": records[-1].get("memory_peak_rss_gib"),
               "final_loss": records[-1]["loss"], "intervals": len(records)}
    model_line = next((line for line in proc.stdout.splitlines() if line.startswith("MFU = ")), None)
    if model_line:
        result["mfu_formula"] = model_line
    ops = os.path.join(run_dir, "profile", "rank0.ops.txt")
    if os.path.exists(ops):  # the operators that hold the step, by device time
        result["profile_top_ops"] = open(ops).read().splitlines()[:24]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help="comma-separated (default: gpt3-125m,gpt3-1.3b on CUDA, tiny on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30 on CUDA, 4 on CPU)")
    ap.add_argument("--accumulation", type=int, default=None, help="micro-batches per step (default 4 on CUDA, 2 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048 on CUDA, 64 on CPU)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the largest the planner fits")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="profile this many steps of each run (torch.profiler); the top operators go in the JSON")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    presets = (args.presets or ("gpt3-125m,gpt3-1.3b" if cuda else "tiny")).split(",")
    steps = args.steps or (30 if cuda else 4)
    accumulation = args.accumulation or (4 if cuda else 2)
    seq = args.seq or (2048 if cuda else 64)
    log_interval = max(1, steps // 6)
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "runs": []}
    if cuda:
        report["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    with tempfile.TemporaryDirectory(prefix="gptforge-gpu-bench-") as workdir:
        for preset in presets:
            micro = args.micro_batch or (largest_micro_batch(preset, seq, report["gpu_memory_gib"], accumulation)
                                         if cuda else 2)
            while True:
                result = run_one(preset, seq_len=seq, micro=micro, accumulation=accumulation, steps=steps,
                                 log_interval=log_interval, precision="bf16" if cuda else "fp32",
                                 compile_=True if cuda else "auto", workdir=workdir, timeout=600,
                                 profile=args.profile)
                print(json.dumps(result), file=sys.stderr, flush=True)
                if result.get("error") == "out of memory" and micro > 1 and not args.micro_batch:
                    micro //= 2
                    continue
                break
            report["runs"].append(result)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
