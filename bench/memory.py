"""Peak memory per rank of real training layouts, against the planner's three peaks (parallel/planner.py).

Each layout is launched twice with torchrun in the same way (gloo on CPU, NCCL on CUDA; same ranks, data,
sequence length, batch and steps): at the measured shape, and at the ``tiny`` preset with the same
vocabulary (the baseline). A training callback (bench/memory_probe.py) records every rank's peak of each
phase (start-up, accumulation, save): the resident set size on CPU, ``torch.cuda.max_memory_allocated``
on CUDA. Measured minus baseline removes what does not depend on the model (interpreter, torch, gloo,
the data pipeline, DeepSpeed's own start-up), and also the tiny model's bytes, so it is compared with the
planner's prediction at the measured shape minus its prediction at the tiny one, phase by phase and rank
by rank (a pipeline rank with its stage). On CPU host and device memory are one: the save is compared with
the planner's device save plus its host staging (the asynchronous save's copy of the rank's shards).
Bytes per parameter divide a rank's largest measured phase by the whole model's parameters: device
memory, so on CPU without the save, whose peak there also holds the host staging.

Layouts are names of dash-separated parts: ``zeroN``, ``tpN``, ``ppN``, ``dpN``, ``ds`` (the DeepSpeed
engine; FSDP otherwise), ``defer`` (``parallel.defer_grad_reduce``) and ``linear`` (``parallel.fsdp_unit:
linear``), e.g. ``zero3-dp8``, ``zero3-tp2-dp4``, ``pp2-dp4``, ``ds-zero3-dp8``, ``zero3-linear-dp8``.

    .venv/bin/python bench/memory.py                 # gpt3-125m with a 2,048-token vocabulary: 88M parameters
    .venv/bin/python bench/memory.py --small         # FSDP ZeRO-3 dp4 on a 15M shape, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import yaml

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from memory_probe import OUT_ENV, PHASES  # noqa: E402

from gptforge.model.config import GPTConfig  # noqa: E402
from gptforge.model.presets import get_preset  # noqa: E402
from gptforge.parallel.dims import ParallelDims  # noqa: E402
from gptforge.parallel.planner import Workload, param_counts, plan_memory  # noqa: E402

DEFAULT_LAYOUTS = ("zero3-dp8", "zero3-tp2-dp4", "pp2-dp4", "ds-zero3-dp8")
BASELINE_PRESET = "tiny"
MIB = 2**20
MMAP_THRESHOLD = 128 * 1024
"""glibc serves allocations from this size up with their own mapping, returned to the system when freed.
Set, it also stops glibc's default of raising the threshold to the largest block freed so far, after which
freed tensors of up to that size stay in the heap and in the resident set: without it the resident set
measures how freed tensor memory fragments the heap, not the tensors alive at the peak."""
SMALL = {"preset": "tiny", "model": {"n_layer": 8, "d_model": 384, "n_head": 6, "context_length": 128},
         "layouts": ("zero3-dp4",)}
"""``--small``: eight blocks of width 384 (15M parameters with a 2,048-token vocabulary)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class Layout:
    """One measured layout: its name and the ``parallel`` config section it stands for."""

    name: str
    parallel: dict

    @property
    def world_size(self) -> int:
        return self.parallel.get("tp", 1) * self.parallel.get("pp", 1) * self.parallel["dp"]


def parse_layout(name: str) -> Layout:
    """``zero3-tp2-dp4`` -> a ``parallel`` section (dp is required; see the module docstring)."""
    parallel: dict = {}
    for part in name.split("-"):
        key = part.rstrip("0123456789")
        value = part[len(key):]
        if part == "ds":
            parallel["zero_engine"] = "deepspeed"
        elif part == "defer":
            parallel["defer_grad_reduce"] = True
        elif part == "linear":
            parallel["fsdp_unit"] = "linear"
        elif key in ("zero", "tp", "pp", "dp") and value:
            parallel["zero_stage" if key == "zero" else key] = int(value)
        else:
            raise SystemExit(f"--layouts: unknown part {part!r} in {name!r} (zeroN, tpN, ppN, dpN, ds, defer, linear)")
    if "dp" not in parallel:
        raise SystemExit(f"--layouts: {name!r} needs a dpN part")
    if parallel.get("tp", 1) > 1:
        parallel["sequence_parallel"] = True  # the planner's default with tp
    return Layout(name=name, parallel=parallel)


def prepare_data(work_dir: str, vocab: int) -> tuple[str, str]:
    """A tokenizer of ``vocab`` entries and an indexed dataset, both from the docstrings of the standard
    library (as the tests' fixtures make them); made once per work folder and vocabulary."""
    from gptforge.data_prep.readers.text_files import stdlib_docstrings
    from gptforge.data_prep.tokenization.indexed_writer import tokenize_to_indexed
    from gptforge.data_prep.tokenization.tokenizer import train_tokenizer

    folder = os.path.join(work_dir, f"data-v{vocab}")
    tokenizer, prefix = os.path.join(folder, "tok.model"), os.path.join(folder, "docs")
    if os.path.exists(prefix + ".idx") and os.path.exists(tokenizer):
        return tokenizer, prefix
    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "docs.jsonl")
    with open(corpus, "w", encoding="utf-8") as handle:
        for i, text in enumerate(stdlib_docstrings()):
            handle.write(json.dumps({"id": i, "text": text}) + "\n")
    tokenizer = train_tokenizer([corpus], os.path.join(folder, "tok"), vocab_size=vocab).model_path
    tokenize_to_indexed([corpus], prefix, tokenizer, progress=False)
    return tokenizer, prefix


@dataclasses.dataclass(kw_only=True, frozen=True)
class Work:
    """What every launch shares."""

    seq_len: int
    micro_batch: int
    micro_batches: int
    """Micro-batches per step on each data-parallel rank."""
    steps: int
    precision: str
    vocab: int
    tokenizer: str
    data: str


def model_section(preset: str, overrides: dict, work: Work) -> dict:
    return {"preset": preset, "vocab_size": work.vocab, "dropout": 0.0} | overrides


def job_config(run_dir: str, model: dict, layout: Layout, work: Work) -> dict:
    dp = layout.parallel["dp"]
    return {
        "run": {"dir": run_dir},
        "model": model,
        "tokenizer": {"path": work.tokenizer},
        "data": {"sources": [{"path": work.data, "weight": 1.0}], "split": "90,10,0", "seed": 7},
        "train": {"max_steps": work.steps, "global_batch_size": work.micro_batches * work.micro_batch * dp,
                  "micro_batch_size": work.micro_batch, "seq_len": work.seq_len, "precision": work.precision,
                  "log_interval": 1, "eval_interval": 0, "seed": 3, "callbacks": ["memory_probe:PeakMemory"]},
        "optim": {"lr": 1e-3, "warmup_tokens": 0, "decay_tokens": 10**9},
        "checkpoint": {"interval": work.steps, "keep_last": 1},
        "mlflow": {"enabled": False},
        "parallel": layout.parallel,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: str, config: dict, world_size: int, timeout: float) -> list[dict]:
    """Run ``gptforge train`` on ``world_size`` ranks; returns each rank's probe record, by rank."""
    os.makedirs(run_dir, exist_ok=True)
    probe_dir = os.path.join(run_dir, "memory")
    os.makedirs(probe_dir, exist_ok=True)
    path = os.path.join(run_dir, "job.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    python_path = [BENCH_DIR, os.environ.get("PYTHONPATH", "")]  # the probe callback's module
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in python_path if p),
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    env[OUT_ENV] = probe_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size), "--master-port",
           str(free_port()), "-m", "gptforge.launcher.cli", "train", "--config", path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"training in {run_dir} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    records = []
    for rank in range(world_size):
        with open(os.path.join(probe_dir, f"rank{rank}.json"), encoding="utf-8") as handle:
            records.append(json.load(handle))
    return records


def measured_bytes(record: dict) -> dict[str, int]:
    """A rank's peak per phase: CUDA allocations where the run had CUDA, else the resident set size."""
    return record["cuda_bytes"] or record["rss_bytes"]


def planned_bytes(config: GPTConfig, layout: Layout, work: Work, on_cuda: bool) -> list[dict[str, int]]:
    """The planner's peaks per pipeline stage (device, plus the save's host staging where host memory is
    what is measured)."""
    dims = ParallelDims(**layout.parallel)
    plan = plan_memory(config, dims, Workload(seq_len=work.seq_len, micro_batch=work.micro_batch,
                                              precision=work.precision))
    out = []
    for stage in plan["stages"]:
        peaks = {phase: stage["peaks"][phase]["total"] for phase in PHASES}
        if not on_cuda:
            peaks["save"] += stage["peaks"]["save"]["host_staging"]
        out.append(peaks)
    return out


def measure_layout(layout: Layout, preset: str, overrides: dict, work: Work, work_dir: str,
                   timeout: float) -> dict:
    """Both launches of one layout and the comparison, per rank."""
    runs = {}
    for kind, (name, extra) in (("measured", (preset, overrides)), ("baseline", (BASELINE_PRESET, {}))):
        run_dir = os.path.join(work_dir, f"{layout.name}-{kind}-{int(time.time())}")
        model = model_section(name, extra, work)
        runs[kind] = launch(run_dir, job_config(run_dir, model, layout, work), layout.world_size, timeout)
    target = get_preset(preset).config(**(overrides | {"vocab_size": work.vocab, "dropout": 0.0}))
    tiny = get_preset(BASELINE_PRESET).config(vocab_size=work.vocab, dropout=0.0)
    on_cuda = runs["measured"][0]["cuda_bytes"] is not None
    plan_target = planned_bytes(target, layout, work, on_cuda)
    plan_tiny = planned_bytes(tiny, layout, work, on_cuda)
    n_params = param_counts(target).total(target.n_layer)
    # Bytes per parameter are device memory per rank. On CPU the save's peak also holds the asynchronous
    # save's host staging (host memory on a GPU machine), so there it is left out of that figure.
    device_phases = PHASES if on_cuda else tuple(p for p in PHASES if p != "save")
    ranks = []
    for measured, baseline in zip(runs["measured"], runs["baseline"]):
        stage = measured["pp_rank"]
        got, base = measured_bytes(measured), measured_bytes(baseline)
        delta = {phase: got[phase] - base[phase] for phase in PHASES}
        planned = {phase: plan_target[stage][phase] - plan_tiny[stage][phase] for phase in PHASES}
        ratio = {phase: delta[phase] / planned[phase] if planned[phase] > 0 else None for phase in PHASES}
        ranks.append({"rank": measured["rank"], "stage": stage, "measured_bytes": got, "baseline_bytes": base,
                      "delta_bytes": delta, "planned_delta_bytes": planned, "measured_over_planned": ratio,
                      "bytes_per_param": max(delta[p] for p in device_phases) / n_params,
                      "peak_reset": measured["reset"] and baseline["reset"]})
    return {"layout": layout.name, "parallel": layout.parallel, "world_size": layout.world_size,
            "memory": "cuda max_memory_allocated" if on_cuda else "host peak RSS (VmHWM)",
            "n_params": n_params, "ranks": ranks,
            "max_bytes_per_param": max(r["bytes_per_param"] for r in ranks),
            "max_measured_over_planned": max((v for r in ranks for v in r["measured_over_planned"].values()
                                              if v is not None), default=None)}


def render(report: dict) -> str:
    """Markdown: one row per layout and rank; cells are measured minus baseline MiB (planned in brackets)."""
    head = ("| layout | rank | stage | start-up MiB (plan) | accumulation MiB (plan) | save MiB (plan) "
            "| B/param | measured / plan |")
    lines = [head, "|" + "---|" * 8]
    for result in report["layouts"]:
        for r in result["ranks"]:
            cells = [f"{r['delta_bytes'][p] / MIB:.0f} ({r['planned_delta_bytes'][p] / MIB:.0f})" for p in PHASES]
            worst = max((v for v in r["measured_over_planned"].values() if v is not None), default=None)
            lines.append(f"| {result['layout']} | {r['rank']} | {r['stage']} | " + " | ".join(cells)
                         + f" | {r['bytes_per_param']:.2f} | {'-' if worst is None else f'{worst:.2f}'} |")
    first = report["layouts"][0] if report["layouts"] else {}
    lines.append("")
    lines.append(f"{first.get('memory', '')} minus the same launch at the `{BASELINE_PRESET}` preset; plan = the "
                 f"planner's peak minus its `{BASELINE_PRESET}` peak; {report['n_params']:,} parameters, "
                 f"seq {report['seq_len']}, micro batch {report['micro_batch']}, {report['micro_batches']} "
                 f"micro-batches per step, {report['steps']} steps, {report['precision']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default=None, help=f"comma-separated (default {','.join(DEFAULT_LAYOUTS)})")
    parser.add_argument("--preset", default=None, help="the measured shape (default gpt3-125m)")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model config values over the preset's, e.g. n_layer=4")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (default 2048)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="per step and data-parallel rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--small", action="store_true", help=f"{SMALL['layouts'][0]} on a 15M-parameter shape")
    parser.add_argument("--work-dir", default=os.path.join(os.getcwd(), "runs", "bench_memory"))
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    args = parser.parse_args(argv)

    preset = args.preset or (SMALL["preset"] if args.small else "gpt3-125m")
    overrides = dict(SMALL["model"]) if args.small and not args.preset else {}
    for item in args.model:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    names = args.layouts.split(",") if args.layouts else list(SMALL["layouts"] if args.small else DEFAULT_LAYOUTS)
    layouts = [parse_layout(name) for name in names]
    os.makedirs(args.work_dir, exist_ok=True)
    tokenizer, data = prepare_data(args.work_dir, args.vocab)
    work = Work(seq_len=args.seq, micro_batch=args.micro_batch, micro_batches=args.micro_batches, steps=args.steps,
                precision=args.precision, vocab=args.vocab, tokenizer=tokenizer, data=data)
    report = {"preset": preset, "model_overrides": overrides, "vocab": args.vocab, "seq_len": args.seq,
              "micro_batch": args.micro_batch, "micro_batches": args.micro_batches, "steps": args.steps,
              "precision": args.precision, "layouts": []}
    for layout in layouts:
        report["layouts"].append(measure_layout(layout, preset, overrides, work, args.work_dir, args.timeout))
        report["n_params"] = report["layouts"][-1]["n_params"]
    print(render(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
