"""``gptforge plan``: parameter count and single-replica memory per preset, built on the meta device; memory
per GPU under a parallel layout, and the layouts of N GPUs that fit (``parallel/planner.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import GPTConfig
from ..model.flops import count_parameters, flops_per_token, replica_memory_bytes
from ..model.presets import PRESETS, get_preset, gpt3_presets
from .planner import (
    GIB,
    MEMORY_KEYS,
    RECOMPUTE_MODES,
    SAFETY_MARGIN,
    ZERO_STAGES,
    Layout,
    fits,
    param_counts,
    plan_memory,
    propose_layouts,
    shape_errors,
    trainer_gaps,
    trainer_settings,
    value_errors,
)


def expand_presets(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(PRESETS)
        elif name == "gpt3":
            out.extend(p.name for p in gpt3_presets())
        else:
            out.append(get_preset(name).name)
    return list(dict.fromkeys(out))


def plan_rows(names: list[str], *, micro_batch: int, seq_len: int | None, precision: str,
              flags: LayoutFlags | None = None, global_batch: int | None = None) -> list[dict]:
    """One row per preset: parameters, FLOPs/token, one replica's memory, and per-GPU memory under ``flags``
    (default: one GPU, no sharding). ``global_batch`` (sequences; default the preset's Table 2.1 batch)
    only enters the trainer's pipeline check of enough micro-batches per step."""
    flags = flags or LayoutFlags()
    if micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {micro_batch}")
    rows = []
    for name in expand_presets(names):
        preset = PRESETS[name]
        config = preset.config()
        seq = seq_len or config.context_length
        if seq > config.context_length:
            raise ValueError(f"--seq {seq} exceeds {name}'s context length {config.context_length}")
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
        layout = flags.layout(micro_batch=micro_batch, seq_len=seq, precision=precision)
        row |= layout_fields(name, config, layout, flags.gpu_memory_gib,
                             global_batch_sequences(name, seq, global_batch))
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


# ---- per-GPU memory under a parallel layout (parallel/planner.py) ----

FLAG_NAMES = {"tp": "--tp", "pp": "--pp", "dp": "--dp", "zero_stage": "--zero", "micro_batch": "--micro-batch",
              "seq_len": "--seq", "recompute": "--recompute", "recompute_every": "--recompute-every",
              "precision": "--precision"}
"""Layout field -> the ``gptforge plan`` flag that sets it, so errors name what the user typed."""
DEFAULT_GPU_MEMORY_GIB = 80.0  # an 80 GB A100/H100


@dataclass(kw_only=True, frozen=True)
class LayoutFlags:
    """The layout flags of ``gptforge plan``; a ``Layout`` per preset once its sequence length is known."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    recompute: str = "none"
    recompute_every: int = 2
    optimizer_offload: bool = False
    sequence_parallel: bool = True
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB

    def layout(self, *, micro_batch: int, seq_len: int, precision: str) -> Layout:
        errors = value_errors(tp=self.tp, pp=self.pp, dp=self.dp, zero_stage=self.zero_stage,
                              micro_batch=micro_batch, seq_len=seq_len, recompute=self.recompute,
                              recompute_every=self.recompute_every, precision=precision, names=FLAG_NAMES)
        if not self.gpu_memory_gib > 0:
            errors.append(f"--gpu-memory must be > 0 (GiB), got {self.gpu_memory_gib}")
        if errors:
            raise ValueError("; ".join(errors))
        return Layout(tp=self.tp, pp=self.pp, dp=self.dp, zero_stage=self.zero_stage, micro_batch=micro_batch,
                      seq_len=seq_len, recompute=self.recompute, recompute_every=self.recompute_every,
                      precision=precision, optimizer_offload=self.optimizer_offload,
                      sequence_parallel=self.sequence_parallel)


def layout_fields(name: str, config: GPTConfig, layout: Layout, gpu_memory_gib: float,
                  global_batch: int | None = None) -> dict:
    """The JSON fields of one preset under one layout (bytes, GiB, whether it fits, how the trainer runs it or
    why it does not)."""
    errors = shape_errors(config, layout, names=FLAG_NAMES)
    if errors:
        raise ValueError(f"{name}: " + "; ".join(errors))
    memory = plan_memory(config, layout)
    per_rank = {key: memory[key] for key in (*MEMORY_KEYS, "total", "host_bytes")}
    return {
        "layout": layout.to_dict(),
        "per_rank_bytes": per_rank,
        "per_rank_gib": {key: value / GIB for key, value in per_rank.items()},
        "params_per_rank": memory["params_per_rank"],
        "model_parallel_params": memory["model_parallel_params"],
        "largest_stage": memory["stage"],
        "largest_stage_role": memory["stage_role"],
        "stage_totals_bytes": [stage["total"] for stage in memory["stages"]],
        "gpu_memory_gib": gpu_memory_gib,
        "safety_margin": SAFETY_MARGIN,
        "fits": fits(memory["total"], gpu_memory_gib),
        "trainer_settings": trainer_settings(layout),
        "trainer_gaps": trainer_gaps(layout, global_batch),
    }


def global_batch_sequences(name: str, seq_len: int, requested: int | None) -> int | None:
    """``--global-batch`` if given, else the preset's Table 2.1 batch in sequences of ``seq_len`` (or None)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--global-batch must be >= 1 (sequences), got {requested}")
        return requested
    tokens = PRESETS[name].batch_tokens
    return tokens // seq_len if tokens else None


def propose_rows(names: list[str], *, n_gpus: int | None, gpus_per_node: int, micro_batch: int,
                 seq_len: int | None, precision: str, flags: LayoutFlags, zero_stages: list[int] | None,
                 recompute: list[str] | None, global_batch: int | None, top: int,
                 runnable_only: bool = False) -> list[dict]:
    """``--propose``: per preset, the layouts of ``n_gpus`` GPUs that fit, cheapest first (at most ``top``).

    Layouts with dp x micro batch above the global batch are dropped: there would be ranks without a
    sequence to work on. ``runnable_only`` keeps the layouts ``gptforge train`` runs today."""
    if n_gpus is None:
        raise ValueError("--propose needs --gpus N (the number of GPUs to lay out)")
    for flag, value in (("--gpus", n_gpus), ("--gpus-per-node", gpus_per_node), ("--top", top),
                        ("--micro-batch", micro_batch), ("--recompute-every", flags.recompute_every)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not flags.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory must be > 0 (GiB), got {flags.gpu_memory_gib}")
    for stage in zero_stages or ():
        if stage not in ZERO_STAGES:
            raise ValueError(f"--zero must be one of 0, 1, 2, 3, got {stage}")
    for mode in recompute or ():
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    rows = []
    for name in expand_presets(names):
        config = PRESETS[name].config()
        seq = seq_len or config.context_length
        if seq > config.context_length:
            raise ValueError(f"--seq {seq} exceeds {name}'s context length {config.context_length}")
        batch = global_batch_sequences(name, seq, global_batch)
        proposals = propose_layouts(
            config, n_gpus=n_gpus, gpus_per_node=gpus_per_node, gpu_memory_gib=flags.gpu_memory_gib,
            seq_len=seq, micro_batch=micro_batch, precision=precision,
            zero_stages=zero_stages or ZERO_STAGES, recompute=recompute or RECOMPUTE_MODES,
            recompute_every=flags.recompute_every, optimizer_offload=flags.optimizer_offload,
            sequence_parallel=flags.sequence_parallel)
        if batch is not None:
            proposals = [p for p in proposals if p.layout.dp * micro_batch <= batch]
        if runnable_only:
            proposals = [p for p in proposals if not trainer_gaps(p.layout, batch)]
        rows.append({
            "preset": name, "n_params": param_counts(config).total(config.n_layer), "n_gpus": n_gpus,
            "gpus_per_node": gpus_per_node, "gpu_memory_gib": flags.gpu_memory_gib, "seq_len": seq,
            "micro_batch": micro_batch, "precision": precision, "global_batch_sequences": batch,
            "runnable_only": runnable_only, "n_fitting": len(proposals),
            "layouts": [layout_fields(name, config, p.layout, flags.gpu_memory_gib, batch) for p in proposals[:top]],
        })
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


def _layout_cells(fields: dict) -> str:
    lay, mem = fields["layout"], fields["per_rank_bytes"]
    mode = f"sel/{lay['recompute_every']}" if lay["recompute"] == "selective" else lay["recompute"]
    mode += "+offload" if lay["optimizer_offload"] else ""
    trainer = "no" if fields["trainer_gaps"] else trainer_engine(fields["trainer_settings"])
    return (f"{lay['tp']:>4}{lay['pp']:>4}{lay['dp']:>6}{lay['zero_stage']:>6}{mode:>14}"
            f"{_gib(mem['weights']):>9}{_gib(mem['gradients']):>7}"
            f"{_gib(mem['master_weights'] + mem['optimizer_state']):>8}{_gib(mem['activations']):>7}"
            f"{_gib(mem['gather_buffers']):>8}{_gib(mem['total']):>8}"
            f"{'yes' if fields['fits'] else 'NO':>6}{trainer:>11}")


LAYOUT_HEAD = (f"{'tp':>4}{'pp':>4}{'dp':>6}{'zero':>6}{'recompute':>14}{'weights':>9}{'grads':>7}{'optim':>8}"
               f"{'act':>7}{'gather':>8}{'total':>8}{'fits':>6}{'trainer':>11}")


def render_layout_table(rows: list[dict]) -> str:
    """Per-GPU memory of each preset under the requested layout (GiB)."""
    if not rows:
        return ""
    first = rows[0]
    head = f"{'preset':<14}" + LAYOUT_HEAD
    lines = [head, "-" * len(head)]
    lines += [f"{r['preset']:<14}" + _layout_cells(r) for r in rows]
    lines.append(f"(GiB per GPU, largest pipeline stage, {first['precision']}, micro batch {first['micro_batch']}; "
                 f"optim = fp32 master + Adam; gather = ZeRO-3 prefetch; fits = total <= {1 - SAFETY_MARGIN:.0%} of "
                 f"{first['gpu_memory_gib']:g} GiB; trainer = how gptforge train runs it today, or no)")
    return "\n".join(lines)


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
            lines += [LAYOUT_HEAD] + [_layout_cells(fields) for fields in r["layouts"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
