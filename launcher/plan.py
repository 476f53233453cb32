"""``gptforge plan``: parameter count and single-replica memory per preset, built on the meta device."""

from __future__ import annotations

from gptforge.model.flops import count_parameters, flops_per_token, replica_memory_bytes
from gptforge.model.presets import PRESETS, get_preset, gpt3_presets


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


def plan_rows(names: list[str], *, micro_batch: int, seq_len: int | None, precision: str) -> list[dict]:
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
