"""The step-time model of ``gptforge plan --time`` (parallel/timing.py) against measured step times.

1. Measures this machine's rates the way training uses them, with the ranks of one launch running at once
   (torchrun, gloo, one thread per rank): fp32 matmul FLOP/s at the model's shapes, memory bandwidth
   (AdamW-like streaming), gloo all-reduce bandwidth and latency between the ranks.
2. Builds a ``Machine`` from them (efficiencies 1: the rates are the achieved ones).
3. Trains each layout with ``gptforge train`` under torchrun on synthetic tokens and takes the median step
   time of the log intervals after the first.
4. Prints predicted and measured step time per layout, and their ratio.

    python bench/time_model.py [--layouts dp2,tp2,pp2,fsdp-dp2] [--steps 12] [--json]

On CPU the non-matmul work (attention softmax, LayerNorm, GELU, optimizer bookkeeping, Python) is a far
larger share of a small model's step than on a GPU; the ratio says how much the model leaves out here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"preset": "tiny", "n_layer": 4, "d_model": 256, "n_head": 4, "context_length": 256, "vocab_size": 2048}
SEQ, MICRO, ACCUMULATION = 256, 4, 2
LAYOUTS = {
    "dp2": {"dp": 2},
    "tp2": {"tp": 2},
    "pp2": {"pp": 2, "pp_schedule": "1f1b"},
    "fsdp-dp2": {"dp": 2, "zero_stage": 3},
}

PROBE = textwrap.dedent('''
    import json, sys, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d, tokens = {d}, {tokens}

    def timed(fn, repeat):
        fn(); dist.barrier()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        dist.barrier()
        return (time.perf_counter() - start) / repeat

    a, w = torch.randn(tokens, d), torch.randn(d, 4 * d)
    matmul = 2 * tokens * d * 4 * d / timed(lambda: a @ w, 20)
    x, y = torch.randn(2**24), torch.randn(2**24)  # 64 MiB each
    stream = 3 * x.numel() * 4 / timed(lambda: torch.add(x, y, out=x), 10)  # read 2, write 1
    buf = torch.randn(2**22)  # 16 MiB
    ring = timed(lambda: dist.all_reduce(buf), 10)
    bus = 2 * (world - 1) / world * buf.numel() * 4 / ring
    small = torch.zeros(1)
    latency = timed(lambda: dist.all_reduce(small), 200) / (2 * (world - 1))
    out = torch.tensor([matmul, stream, bus, latency], dtype=torch.float64)
    dist.all_reduce(out)
    if rank == 0:
        print(json.dumps(dict(zip(["matmul_flops", "memory_bytes_s", "allreduce_bus_bytes_s", "latency_s"],
                                  (out / world).tolist()))))
    dist.destroy_process_group()
''')


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29600 + os.getpid() % 1000), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def measure_rates(nproc: int, workdir: str) -> dict:
    path = os.path.join(workdir, "probe.py")
    with open(path, "w") as handle:
        handle.write(PROBE.format(d=MODEL["d_model"], tokens=MICRO * SEQ))
    proc = torchrun(nproc, path)
    if proc.returncode != 0:
        raise SystemExit(f"rate probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured_step(name: str, parallel: dict, steps: int, workdir: str) -> dict:
    run_dir = os.path.join(workdir, name)
    dp = parallel.get("dp", 1)
    cfg = {"run": {"dir": run_dir}, "model": MODEL, "data": {"mock": True},
           "train": {"max_steps": steps, "global_batch_size": dp * MICRO * ACCUMULATION, "micro_batch_size": MICRO,
                     "seq_len": SEQ, "precision": "fp32", "log_interval": max(1, steps // 4), "eval_interval": 0,
                     "sample_tokens": 0},
           "optim": {"lr": 1e-4, "warmup_tokens": 0},
           "parallel": parallel, "checkpoint": {"enabled": False}, "mlflow": {"enabled": False}}
    path = run_dir + ".yaml"
    with open(path, "w") as handle:
        yaml.safe_dump(cfg, handle)
    proc = torchrun(2, "-m", "gptforge.launcher.cli", "train", "--config", path)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {"step_s": statistics.median(r["step_time_s"] for r in records[1:]), "global_batch": cfg["train"]["global_batch_size"]}


def predicted_step(parallel: dict, global_batch: int, machine) -> dict:
    from gptforge.model.config import GPTConfig
    from gptforge.model.presets import PRESETS
    from gptforge.parallel.config import ParallelConfig
    from gptforge.parallel.dims import ParallelDims
    from gptforge.parallel.planner import Workload
    from gptforge.parallel.timing import step_time

    config = GPTConfig(**(PRESETS["tiny"].model | {k: v for k, v in MODEL.items() if k != "preset"}))
    errors: list[str] = []
    dims = ParallelDims.from_config(ParallelConfig(**parallel), 2, errors)
    assert not errors, errors
    return step_time(config, dims, Workload(seq_len=SEQ, micro_batch=MICRO, precision="fp32"), global_batch,
                     machine).as_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from gptforge.parallel.timing import Machine

    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown} (known: {', '.join(LAYOUTS)})")
    with tempfile.TemporaryDirectory(prefix="gptforge-time-model-") as workdir:
        rates = measure_rates(2, workdir)
        machine = Machine(name="this CPU, 2 gloo ranks (measured)", peak_flops=rates["matmul_flops"],
                          hbm=rates["memory_bytes_s"], intra_node=rates["allreduce_bus_bytes_s"],
                          inter_node=rates["allreduce_bus_bytes_s"], gpus_per_node=2, matmul_efficiency=1.0,
                          link_efficiency=1.0, memory_efficiency=1.0, latency=rates["latency_s"])
        rows = []
        for name in names:
            got = measured_step(name, LAYOUTS[name], args.steps, workdir)
            want = predicted_step(LAYOUTS[name], got["global_batch"], machine)
            rows.append({"layout": name, "measured_step_s": got["step_s"], "predicted_step_s": want["step_s"],
                         "measured_over_predicted": got["step_s"] / want["step_s"], "predicted": want})
    report = {"rates": rates, "model": MODEL, "seq_len": SEQ, "micro_batch": MICRO, "accumulation": ACCUMULATION,
              "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"rates per rank: matmul {rates['matmul_flops'] / 1e9:.1f} GFLOP/s, memory "
              f"{rates['memory_bytes_s'] / 1e9:.1f} GB/s, all-reduce bus {rates['allreduce_bus_bytes_s'] / 1e9:.2f} GB/s, "
              f"latency {rates['latency_s'] * 1e6:.0f} us")
        print(f"{'layout':<10}{'measured s':>12}{'predicted s':>13}{'ratio':>8}   predicted terms")
        for r in rows:
            p = r["predicted"]
            terms = (f"compute {p['compute_s']:.3f}, tp {p['tp_comm_s']:.3f}, bubble {p['pp_bubble_s']:.3f}, "
                     f"p2p {p['pp_p2p_s']:.3f}, dp {p['dp_exposed_s']:.3f}/{p['dp_comm_s']:.3f}, opt {p['optimizer_s']:.3f}")
            print(f"{r['layout']:<10}{r['measured_step_s']:>12.3f}{r['predicted_step_s']:>13.3f}"
                  f"{r['measured_over_predicted']:>8.2f}   {terms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
