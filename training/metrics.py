"""Metrics of the logged steps on disk (``metrics.jsonl``), memory readings and the loss-curve plot."""

from __future__ import annotations

import json
import os
import resource

import torch

from ..common.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSON lines, one per logged step. On resume, records past the resumed step (written by the
    run that was killed after its last checkpoint) are dropped, so each step appears once."""

    def __init__(self, path: str, resume_step: int) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            kept = [line for line in read_metrics(path) if line["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
    return records


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This rank's memory: on CUDA the caching allocator's peaks since the start (what a layout's plan is
    checked against: ``torch.cuda.max_memory_allocated``; reserved adds the allocator's cached blocks),
    on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "cuda_max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # ru_maxrss is in KiB on Linux
    return {"memory_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def plot_loss_curve(metrics_path: str, png_path: str) -> str | None:
    """Training and validation loss against tokens seen; returns the PNG path (None without data)."""
    if not os.path.exists(metrics_path):
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens_seen"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
