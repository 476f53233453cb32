"""``gptforge plan``: parameter count and single-replica memory per preset, built on the meta device; memory
per GPU under a parallel layout at its start-up, accumulation and save peaks, and the layouts of N GPUs whose
peaks all fit (``parallel/planner.py``).

``add_arguments``/``run`` are the command (see launcher/cli.py); ``run`` turns the flags into a
``ParallelDims`` layout and typed values, and every bad flag into a ``UserError`` naming it."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

from ..common.errors import UserError
from ..common.hardware import ALIASES, compute_precision, device_spec
from ..model.config import GPTConfig
from ..model.flops import count_parameters, flops_per_token, replica_memory_bytes
from ..model.presets import PRESETS, get_preset, gpt3_presets
from .config import ParallelConfig
from .dims import FSDP_STAGES, FSDP_UNITS, RECOMPUTE_MODES, ZERO_STAGES, ParallelDims, value_errors
from .planner import (GIB, KEY_LABELS, MEMORY_KEYS, PHASE_LABELS, PHASES, SAFETY_MARGIN, Workload, fit_errors, fits,
                      layout_dict, param_counts, plan_memory, shape_errors, trainer_gaps, trainer_settings,
                      work_errors)
from .propose import propose_layouts
from .timing import Machine, step_time

FLAG_NAMES = {"tp": "--tp", "pp": "--pp", "dp": "--dp", "zero_stage": "--zero", "micro_batch": "--micro-batch",
              "seq_len": "--seq", "recompute": "--recompute", "recompute_every": "--recompute-every",
              "precision": "--precision", "defer_grad_reduce": "--defer-grad-reduce",
              "fsdp_unit": "--fsdp-unit"}
"""Layout and work field -> the ``gptforge plan`` flag that sets it, so errors name what the user typed."""
DEFAULT_GPU_MEMORY_GIB = 80.0  # an 80 GB A100/H100
SINGLE_GPU = ParallelConfig(dp=1, sequence_parallel=True)
"""The layout without --tp/--pp/--dp flags; sequence parallelism is on unless --no-sequence-parallel (it
only acts with tp > 1)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Per-GPU rules: parallel/planner.py; guide: docs/parallelism.md."
    p.add_argument("--preset", action="append", required=True,
                   help="a preset name, 'gpt3' for the eight GPT-3 sizes or 'all'; repeatable")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's context)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default 1)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default 1)")
    p.add_argument("--zero", type=int, default=None,
                   help="ZeRO stage 0-3 (default 0); with --propose, only this stage")
    p.add_argument("--recompute", default=None,
                   help="none, selective (every --recompute-every-th block) or full (default none); "
                        "with --propose, only this mode")
    p.add_argument("--recompute-every", type=int, default=2, help="with --recompute selective (default 2)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU in GiB for 'fits' (default 80)")
    p.add_argument("--optimizer-offload", action="store_true", help="optimizer state and master weights on the host")
    p.add_argument("--no-sequence-parallel", action="store_true", help="tp without sequence parallelism")
    p.add_argument("--defer-grad-reduce", action="store_true",
                   help="FSDP (--zero 2/3): keep unsharded gradients until the step's last micro-batch "
                        "(parallel.defer_grad_reduce); with --propose, for every FSDP layout")
    p.add_argument("--fsdp-unit", choices=FSDP_UNITS, default="block",
                   help="FSDP (--zero 2/3): one unit per block, or per linear layer (parallel.fsdp_unit); "
                        "with --propose, for every FSDP layout")
    p.add_argument("--propose", action="store_true", help="list the layouts of --gpus GPUs that fit, best first")
    p.add_argument("--gpus", type=int, default=None, help="with --propose: number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --propose: the largest tp (default 8)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step: with --propose it caps dp x micro batch; both modes check the "
                        "trainer's pipeline rule of >= pp micro-batches (default: the preset's Table 2.1 batch)")
    p.add_argument("--top", type=int, default=10, help="with --propose: layouts shown per preset (default 10)")
    p.add_argument("--time", action="store_true",
                   help="predict step time, tokens/s and MFU per layout (parallel/timing.py); with --propose, "
                        "rank the layouts that fit by it")
    p.add_argument("--device", default="h100",
                   help="with --time: the GPU (an exact torch device name or a short one: h100, h100-pcie, "
                        "h100-nvl, h200, h200-nvl, a100, a100-40gb, l40s, ...; default h100)")
    p.add_argument("--inter-node-gbps", type=float, default=400.0,
                   help="with --time: network bandwidth per GPU across nodes, Gbit/s (default 400, InfiniBand NDR)")
    p.add_argument("--matmul-efficiency", type=float, default=Machine.matmul_efficiency,
                   help=f"with --time: achieved fraction of the peak FLOP/s (default {Machine.matmul_efficiency})")
    p.add_argument("--link-efficiency", type=float, default=Machine.link_efficiency,
                   help=f"with --time: achieved fraction of link bandwidth (default {Machine.link_efficiency})")
    p.add_argument("--runnable", action="store_true",
                   help="with --propose: only layouts that 'gptforge train' accepts today")


def machine_from_args(args: argparse.Namespace) -> Machine | None:
    """``--time``'s machine: the ``--device`` GPU at the precision its matmuls run in (fp32 as TF32)."""
    if not args.time:
        return None
    spec = device_spec(args.device) or ALIASES.get(args.device.lower())
    if spec is None:
        raise UserError(f"--device {args.device!r}: not a known GPU (exact names in common/hardware.py, or one of "
                        f"{', '.join(sorted(ALIASES))})")
    errors = [f"{flag} must be in (0, 1], got {value}" for flag, value in
              (("--matmul-efficiency", args.matmul_efficiency), ("--link-efficiency", args.link_efficiency))
              if not 0 < value <= 1]
    if not args.inter_node_gbps > 0:
        errors.append(f"--inter-node-gbps must be > 0, got {args.inter_node_gbps}")
    if errors:
        raise UserError("; ".join(errors))
    return Machine.from_device(spec, compute_precision(args.precision, tf32=True), inter_node_gbps=args.inter_node_gbps,
                               gpus_per_node=args.gpus_per_node, matmul_efficiency=args.matmul_efficiency,
                               link_efficiency=args.link_efficiency)


def run(args: argparse.Namespace) -> int:
    gpu_memory = args.gpu_memory if args.gpu_memory is not None else DEFAULT_GPU_MEMORY_GIB
    common = dict(micro_batch=args.micro_batch, seq_len=args.seq, precision=args.precision, gpu_memory_gib=gpu_memory,
                  machine=machine_from_args(args))
    if args.propose:
        for flag, given in (("--defer-grad-reduce", args.defer_grad_reduce),
                            ("--fsdp-unit linear", args.fsdp_unit == "linear")):
            if given and args.zero is not None and args.zero not in FSDP_STAGES:
                raise UserError(f"{flag} needs --zero 2 or 3 (FSDP), got --zero {args.zero}")
        # The search chooses tp, pp and dp; --zero and --recompute narrow it to the given value.
        for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--dp", args.dp)):
            if value is not None:
                raise UserError(f"{flag} cannot be combined with --propose (the search chooses it)")
        rows = propose_rows(args.preset, n_gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                            zero_stages=None if args.zero is None else [args.zero],
                            recompute=None if args.recompute is None else [args.recompute],
                            recompute_every=args.recompute_every, optimizer_offload=args.optimizer_offload,
                            sequence_parallel=not args.no_sequence_parallel,
                            defer_grad_reduce=args.defer_grad_reduce, fsdp_unit=args.fsdp_unit,
                            global_batch=args.global_batch,
                            top=args.top, runnable_only=args.runnable, **common)
        print(json.dumps(rows, indent=2) if args.json else render_proposals(rows))
        return 0
    for flag, value in (("--gpus", args.gpus), ("--runnable", args.runnable or None)):
        if value is not None:
            raise UserError(f"{flag} only applies with --propose (give --tp/--pp/--dp for one layout)")
    parallel = ParallelConfig(tp=1 if args.tp is None else args.tp, pp=1 if args.pp is None else args.pp,
                              dp=1 if args.dp is None else args.dp, zero_stage=args.zero or 0,
                              recompute=args.recompute or "none", recompute_every=args.recompute_every,
                              optimizer_offload=args.optimizer_offload,
                              sequence_parallel=not args.no_sequence_parallel,
                              defer_grad_reduce=args.defer_grad_reduce, fsdp_unit=args.fsdp_unit)
    rows = plan_rows(args.preset, parallel=parallel, global_batch=args.global_batch, **common)
    text = render_table(rows) + "\n\n" + render_layout_table(rows) + "\n\n" + render_peaks(rows)
    if common["machine"] is not None:
        text += "\n\n" + render_times(rows)
    print(json.dumps(rows, indent=2) if args.json else text)
    return 0


def expand_presets(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(PRESETS)
        elif name == "gpt3":
            out.extend(p.name for p in gpt3_presets())
        else:
            try:
                out.append(get_preset(name).name)
            except ValueError as err:
                raise UserError(str(err)) from None
    return list(dict.fromkeys(out))


def flag_plan(parallel: ParallelConfig, *, gpu_memory_gib: float, seq_len: int, micro_batch: int,
              precision: str) -> tuple[ParallelDims, Workload]:
    """The layout (``parallel``, from the flags) and work ``gptforge plan`` describes, every bad value named
    by its flag in one ``UserError``."""
    errors = value_errors(parallel, FLAG_NAMES)
    if parallel.defer_grad_reduce and parallel.zero_stage not in FSDP_STAGES:
        errors.append(f"--defer-grad-reduce needs --zero 2 or 3 (FSDP), got --zero {parallel.zero_stage}")
    if parallel.fsdp_unit != "block" and parallel.zero_stage not in FSDP_STAGES:
        errors.append(f"--fsdp-unit {parallel.fsdp_unit} needs --zero 2 or 3 (FSDP), got --zero {parallel.zero_stage}")
    errors += work_errors(micro_batch=micro_batch, seq_len=seq_len, precision=precision, names=FLAG_NAMES)
    if not gpu_memory_gib > 0:
        errors.append(f"--gpu-memory must be > 0 (GiB), got {gpu_memory_gib}")
    if errors:
        raise UserError("; ".join(errors))
    return (ParallelDims(**dataclasses.asdict(parallel)),
            Workload(seq_len=seq_len, micro_batch=micro_batch, precision=precision))


def preset_seq_len(name: str, config: GPTConfig, seq_len: int | None) -> int:
    seq = seq_len or config.context_length
    if seq > config.context_length:
        raise UserError(f"--seq {seq} exceeds {name}'s context length {config.context_length}")
    return seq


def plan_rows(names: list[str], *, micro_batch: int, seq_len: int | None, precision: str,
              parallel: ParallelConfig | None = None, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
              global_batch: int | None = None, machine: Machine | None = None) -> list[dict]:
    """One row per preset: parameters, FLOPs/token, one replica's memory, and per-GPU memory under the layout
    ``parallel`` (default: one GPU, no sharding). ``global_batch`` (sequences; default the preset's Table 2.1
    batch) only enters the trainer's pipeline check of enough micro-batches per step."""
    if micro_batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {micro_batch}")
    rows = []
    for name in expand_presets(names):
        preset = PRESETS[name]
        config = preset.config()
        seq = preset_seq_len(name, config, seq_len)
        counts = count_parameters(config)
        memory = replica_memory_bytes(config, micro_batch=micro_batch, seq_len=seq, precision=precision)
        row = {
            "preset": name,
            "source": preset.source,
            "n_layer": config.n_layer, "d_model": config.d_model, "n_head": config.n_head,
            "n_params": counts["total"],
            "n_params_unpadded_vocab": counts["unpadded"],
            "paper_params": preset.paper_params,
            "params_vs_paper_pct": (100.0 * (counts["unpadded"] / preset.paper_params - 1.0)
                                    if preset.paper_params else None),
            "seq_len": seq, "micro_batch": micro_batch, "precision": precision,
            "flops_per_token": flops_per_token(config, seq),
            "memory_bytes": memory,
            "memory_gib": {k: v / 2**30 for k, v in memory.items()},
        }
        if preset.batch_tokens:
            row |= {"paper_batch_tokens": preset.batch_tokens, "paper_lr": preset.lr}
        dims, work = flag_plan(parallel or SINGLE_GPU, gpu_memory_gib=gpu_memory_gib, seq_len=seq,
                               micro_batch=micro_batch, precision=precision)
        batch = global_batch_sequences(name, seq, global_batch)
        row |= layout_fields(name, config, dims, work, gpu_memory_gib, batch)
        if machine is not None:
            row["time"] = layout_time(name, config, dims, work, batch, machine)
            row["machine"] = dataclasses.asdict(machine)
        rows.append(row)
    return rows


def render_table(rows: list[dict]) -> str:
    head = f"{'preset':<14}{'params':>16}{'vs paper':>10}{'weights GiB':>13}{'optim GiB':>11}{'act GiB':>10}{'total GiB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r["memory_gib"]
        vs = f"{r['params_vs_paper_pct']:+.2f}%" if r["params_vs_paper_pct"] is not None else "-"
        lines.append(f"{r['preset']:<14}{r['n_params']:>16,}{vs:>10}{g['weights']:>13.2f}"
                     f"{g['optimizer_state'] + g['master_weights']:>11.2f}{g['activations']:>10.2f}{g['total']:>11.2f}")
    lines.append(f"(one unsharded replica, {rows[0]['precision']}, micro batch {rows[0]['micro_batch']}; "
                 f"Korthikanti et al. activations without recompute)" if rows else "")
    return "\n".join(lines)


def layout_fields(name: str, config: GPTConfig, dims: ParallelDims, work: Workload, gpu_memory_gib: float,
                  global_batch: int | None = None) -> dict:
    """The JSON fields of one preset under one layout (bytes, GiB, whether it fits, how the trainer runs it or
    why it does not)."""
    errors = shape_errors(config, dims, work, names=FLAG_NAMES)
    if errors:
        raise UserError(f"{name}: " + "; ".join(errors))
    memory = plan_memory(config, dims, work)
    per_rank = {key: memory[key] for key in (*MEMORY_KEYS, "total", "host_bytes", "save_host_bytes")}
    return {
        "layout": layout_dict(dims, work),
        "per_rank_bytes": per_rank,
        "per_rank_gib": {key: value / GIB for key, value in per_rank.items()},
        "peak_phase": memory["peak_phase"],
        "peaks_bytes": memory["peaks"],
        "peaks_gib": {phase: peak["total"] / GIB for phase, peak in memory["peaks"].items()},
        "params_per_rank": memory["params_per_rank"],
        "model_parallel_params": memory["model_parallel_params"],
        "largest_stage": memory["stage"],
        "largest_stage_role": memory["stage_role"],
        "stage_totals_bytes": [stage["total"] for stage in memory["stages"]],
        "gpu_memory_gib": gpu_memory_gib,
        "safety_margin": SAFETY_MARGIN,
        "fits": fits(memory["total"], gpu_memory_gib),
        "fit_errors": fit_errors(memory, gpu_memory_gib),
        "trainer_settings": trainer_settings(dims, work),
        "trainer_gaps": trainer_gaps(dims, work, global_batch),
    }


def layout_time(name: str, config: GPTConfig, dims: ParallelDims, work: Workload, global_batch: int | None,
                machine: Machine) -> dict:
    """``--time``'s prediction for one layout (``parallel/timing.py``), with the global batch it assumes."""
    if global_batch is None:
        raise UserError(f"{name}: --time needs --global-batch (sequences per step): the preset has no paper batch")
    return timed(config, dims, work, global_batch, machine)


def timed(config: GPTConfig, dims: ParallelDims, work: Workload, global_batch: int, machine: Machine) -> dict:
    """The prediction for the largest batch of at most ``global_batch`` sequences that the layout splits
    evenly (a multiple of dp x micro batch; the batch it assumes is in the result)."""
    unit = dims.dp * work.micro_batch
    batch = max(unit, global_batch // unit * unit)
    return step_time(config, dims, work, batch, machine).as_dict() | {"global_batch": batch}


def global_batch_sequences(name: str, seq_len: int, requested: int | None) -> int | None:
    """``--global-batch`` if given, else the preset's Table 2.1 batch in sequences of ``seq_len`` (or None)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--global-batch must be >= 1 (sequences), got {requested}")
        return requested
    tokens = PRESETS[name].batch_tokens
    return tokens // seq_len if tokens else None


def propose_rows(names: list[str], *, n_gpus: int | None, gpus_per_node: int, micro_batch: int,
                 seq_len: int | None, precision: str, gpu_memory_gib: float, zero_stages: list[int] | None,
                 recompute: list[str] | None, recompute_every: int, optimizer_offload: bool,
                 sequence_parallel: bool, global_batch: int | None, top: int,
                 runnable_only: bool = False, defer_grad_reduce: bool = False,
                 fsdp_unit: str = "block", machine: Machine | None = None) -> list[dict]:
    """``--propose``: per preset, the layouts of ``n_gpus`` GPUs whose peaks all fit, cheapest first (at most
    ``top``).

    Layouts with dp x micro batch above the global batch are dropped: there would be ranks without a
    sequence to work on. ``runnable_only`` keeps the layouts ``gptforge train`` runs today."""
    if n_gpus is None:
        raise UserError("--propose needs --gpus N (the number of GPUs to lay out)")
    for flag, value in (("--gpus", n_gpus), ("--gpus-per-node", gpus_per_node), ("--top", top),
                        ("--micro-batch", micro_batch)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not gpu_memory_gib > 0:
        raise UserError(f"--gpu-memory must be > 0 (GiB), got {gpu_memory_gib}")
    # The layout values the search does not choose, by the rules of every layout.
    for stage, mode in itertools.product(zero_stages or (0,), recompute or ("none",)):
        errors = value_errors(ParallelConfig(dp=1, zero_stage=stage, recompute=mode, recompute_every=recompute_every),
                              FLAG_NAMES)
        if errors:
            raise UserError("; ".join(errors))
    rows = []
    for name in expand_presets(names):
        config = PRESETS[name].config()
        seq = preset_seq_len(name, config, seq_len)
        work = Workload(seq_len=seq, micro_batch=micro_batch, precision=precision)
        batch = global_batch_sequences(name, seq, global_batch)
        proposals = propose_layouts(
            config, n_gpus=n_gpus, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib,
            seq_len=seq, micro_batch=micro_batch, precision=precision,
            zero_stages=zero_stages or ZERO_STAGES, recompute=recompute or RECOMPUTE_MODES,
            recompute_every=recompute_every, optimizer_offload=optimizer_offload,
            sequence_parallel=sequence_parallel, defer_grad_reduce=defer_grad_reduce, fsdp_unit=fsdp_unit)
        if batch is not None:
            proposals = [p for p in proposals if p.layout.dp * micro_batch <= batch]
        if runnable_only:
            proposals = [p for p in proposals if not trainer_gaps(p.layout, work, batch)]
        times = {}
        if machine is not None:  # fastest per token first
            if batch is None:
                raise UserError(f"{name}: --time needs --global-batch (sequences per step): the preset has no paper batch")
            times = {id(p): timed(config, p.layout, work, batch, machine) for p in proposals}
            proposals.sort(key=lambda p: -times[id(p)]["tokens_per_s"])
        rows.append({
            "preset": name, "n_params": param_counts(config).total(config.n_layer), "n_gpus": n_gpus,
            "gpus_per_node": gpus_per_node, "gpu_memory_gib": gpu_memory_gib, "seq_len": seq,
            "micro_batch": micro_batch, "precision": precision, "global_batch_sequences": batch,
            "runnable_only": runnable_only, "n_fitting": len(proposals),
            "layouts": [layout_fields(name, config, p.layout, work, gpu_memory_gib, batch)
                        | ({"time": times[id(p)]} if times else {}) for p in proposals[:top]],
        } | ({"machine": dataclasses.asdict(machine)} if machine is not None else {}))
    return rows


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def trainer_engine(settings: dict) -> str:
    """What does the data-parallel work in ``gptforge train`` for these settings (the table's trainer column)."""
    if settings["zero_stage"] > 0:
        return settings["zero_engine"]
    if settings["dp"] > 1:
        return "pipeline" if settings["pp"] > 1 else "ddp"
    return "pipeline" if settings["pp"] > 1 else "yes"


def _mode(lay: dict) -> str:
    mode = f"sel/{lay['recompute_every']}" if lay["recompute"] == "selective" else lay["recompute"]
    mode += "+offload" if lay["optimizer_offload"] else ""
    mode += "+defer" if lay["defer_grad_reduce"] else ""
    return mode + ("+linear" if lay["fsdp_unit"] == "linear" else "")


def _layout_cells(fields: dict) -> str:
    lay, peaks, mem = fields["layout"], fields["peaks_bytes"], fields["per_rank_bytes"]
    trainer = "no" if fields["trainer_gaps"] else trainer_engine(fields["trainer_settings"])
    host = mem["host_bytes"] + mem["save_host_bytes"]
    cells = (f"{lay['tp']:>4}{lay['pp']:>4}{lay['dp']:>6}{lay['zero_stage']:>6}{_mode(lay):>14}"
             + "".join(f"{_gib(peaks[phase]['total']):>10}" for phase in PHASES)
             + f"{_gib(host):>7}{'yes' if fields['fits'] else 'NO':>6}{trainer:>11}")
    if "time" in fields:
        t = fields["time"]
        cells += f"{t['step_s']:>9.2f}{t['tokens_per_s'] / 1e3:>10,.0f}{t['mfu_6n_attn']:>7.0%}"
    return cells


TIME_HEAD = f"{'step s':>9}{'ktok/s':>10}{'MFU':>7}"


LAYOUT_HEAD = (f"{'tp':>4}{'pp':>4}{'dp':>6}{'zero':>6}{'recompute':>14}{'start-up':>10}{'accum':>10}{'save':>10}"
               f"{'host':>7}{'fits':>6}{'trainer':>11}")
LAYOUT_NOTE = ("GiB per GPU at each peak, largest pipeline stage; host = offloaded optimizer + the asynchronous "
               "save's staging, host memory; fits = every peak <= {limit:.0%} of {memory:g} GiB; trainer = how "
               "gptforge train runs it today, or no")


def render_layout_table(rows: list[dict]) -> str:
    """Per-GPU peaks of each preset under the requested layout (GiB)."""
    if not rows:
        return ""
    first = rows[0]
    head = f"{'preset':<14}" + LAYOUT_HEAD
    lines = [head, "-" * len(head)]
    lines += [f"{r['preset']:<14}" + _layout_cells(r) for r in rows]
    lines.append(f"({first['precision']}, micro batch {first['micro_batch']}; "
                 + LAYOUT_NOTE.format(limit=1 - SAFETY_MARGIN, memory=first["gpu_memory_gib"]) + ")")
    return "\n".join(lines)


def peak_lines(fields: dict) -> list[str]:
    """Each peak's named breakdown (GiB), then why the layout does not fit, if it does not."""
    lines = []
    for phase in PHASES:
        peak = fields["peaks_bytes"][phase]
        parts = " + ".join(f"{KEY_LABELS[key]} {_gib(peak[key])}" for key in MEMORY_KEYS if peak[key] >= GIB / 20)
        where = f"stage {peak['stage']}" + (f", at the {peak['at']}" if phase == "accumulation" else "")
        line = f"  {PHASE_LABELS[phase]:<13}{_gib(peak['total']):>7} GiB = {parts or '~0'} ({where})"
        if phase == "save":
            line += f"; host staging {_gib(peak['host_staging'])} GiB"
        lines.append(line)
    return lines + [f"  does not fit: {error}" for error in fields["fit_errors"]]


def render_peaks(rows: list[dict]) -> str:
    """``gptforge plan`` with one layout: every preset's three peaks, broken down."""
    blocks = []
    for r in rows:
        lay = r["layout"]
        blocks.append(f"{r['preset']} on tp{lay['tp']} x pp{lay['pp']} x dp{lay['dp']}, zero {lay['zero_stage']} "
                      f"({lay['engine']}{', deferred gradient reduction' if lay['defer_grad_reduce'] else ''}), "
                      f"per GPU (parts under 0.05 GiB not shown):\n" + "\n".join(peak_lines(r)))
    return "\n\n".join(blocks)


def render_proposals(rows: list[dict]) -> str:
    blocks = []
    for r in rows:
        batch = f", global batch {r['global_batch_sequences']} sequences" if r["global_batch_sequences"] else ""
        lines = [f"{r['preset']} ({r['n_params'] / 1e9:.2f}B parameters) on {r['n_gpus']} GPUs, "
                 f"{r['gpus_per_node']} per node, {r['gpu_memory_gib']:g} GiB each ({r['precision']}, micro batch "
                 f"{r['micro_batch']}, seq {r['seq_len']}{batch}): {r['n_fitting']} layouts fit"
                 + (" that gptforge train runs today" if r["runnable_only"] else "")
                 + (f", best {len(r['layouts'])}:" if r["layouts"] else "")]
        if r["layouts"]:
            lines += [LAYOUT_HEAD + (TIME_HEAD if "machine" in r else "")] + [_layout_cells(f) for f in r["layouts"]]
        blocks.append("\n".join(lines))
    if rows:
        blocks.append("(" + LAYOUT_NOTE.format(limit=1 - SAFETY_MARGIN, memory=rows[0]["gpu_memory_gib"]) + ")")
        if "machine" in rows[0]:
            blocks.append(time_note(rows[0]["machine"]) + "; ranked by predicted tokens/s")
    return "\n\n".join(blocks)


def time_note(machine: dict) -> str:
    return (f"(predicted on {machine['name']}: {machine['peak_flops'] / 1e12:.0f} TFLOP/s peak at "
            f"{machine['matmul_efficiency']:.0%}, {machine['intra_node'] / 1e9:.0f} GB/s within a node and "
            f"{machine['inter_node'] / 1e9:.0f} GB/s across nodes per GPU at {machine['link_efficiency']:.0%}, "
            f"{machine['hbm'] / 1e12:.2f} TB/s HBM, {machine['gpus_per_node']} GPUs per node; MFU counts "
            f"6N + 12*L*d*T; parallel/timing.py)")


def render_times(rows: list[dict]) -> str:
    """``gptforge plan --time`` with one layout: each preset's predicted step, term by term."""
    blocks = []
    for r in rows:
        t = r["time"]
        terms = ", ".join(f"{label} {t[key]:.3f}" for label, key in (
            ("compute", "compute_s"), ("tp", "tp_comm_s"), ("bubble", "pp_bubble_s"), ("p2p", "pp_p2p_s"),
            ("dp exposed", "dp_exposed_s"), ("optimizer", "optimizer_s")))
        blocks.append(f"{r['preset']}: step {t['step_s']:.3f} s for {t['global_batch']} sequences ({terms}; dp traffic "
                      f"{t['dp_comm_s']:.3f} s in all), {t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu_6n_attn']:.1%} "
                      f"(6N + attn) / {t['mfu_6n']:.1%} (6N)")
    return "\n".join(blocks) + ("\n" + time_note(rows[0]["machine"]) if rows else "")
