"""The corpus build report: per-stage counts merged from every task's completion marker, as
``report.json`` plus PNG plots (removal reasons, quality-score histogram, dedup cluster sizes), and the
whole run logged to MLflow (parameters, counts as metrics, report and plots as artifacts).

Marker fields a task may fill (all optional): ``docs_in``, ``docs_out``, ``bytes_in``, ``bytes_out``,
``removed`` {reason: documents}, ``lines_removed`` {rule: lines}, ``skipped`` {reason: count} with
``skipped_examples`` {reason: [where ...]}, ``languages`` {code: documents}, ``quality_hist`` (counts
in ``QUALITY_BINS`` equal bins over [0, 1]), ``cluster_sizes`` {size: clusters}, ``seconds``; anything
else is summed when numeric.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

from ...common.atomic import atomic_write_bytes, atomic_write_json

QUALITY_BINS = 20


def merge_stage(markers: list[dict]) -> dict:
    """Sum one stage's task markers into one record: numbers add up, dicts of numbers add up per key,
    lists of numbers (histograms) add up element-wise, the first examples of each skip reason are kept."""
    out: dict = {"tasks": len(markers)}
    counters: dict[str, Counter] = {}
    examples: dict[str, list[str]] = {}
    lists: dict[str, list] = {}
    for marker in markers:
        for key, value in marker.items():
            if key == "skipped_examples":
                for reason, where in value.items():
                    seen = examples.setdefault(reason, [])
                    seen.extend(where[: max(0, 5 - len(seen))])
            elif isinstance(value, dict):
                counters.setdefault(key, Counter()).update(
                    {str(k): v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                lists[key] = [a + b for a, b in zip(lists[key], value)] if key in lists else list(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "index":
                out[key] = out.get(key, 0) + value
    for key, counter in counters.items():
        out[key] = dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
    if examples:
        out["skipped_examples"] = examples
    out.update(lists)
    if "seconds" in out:
        out["seconds"] = round(out["seconds"], 3)
    return out


def read_markers(work_dir: str, stage: str) -> list[dict]:
    markers = []
    for path in sorted(glob.glob(os.path.join(work_dir, stage, "task_*.done.json"))):
        with open(path, encoding="utf-8") as handle:
            markers.append(json.load(handle))
    return markers


def build_report(work_dir: str, stage_names: list[str]) -> dict:
    stages = {name: merge_stage(read_markers(work_dir, name)) for name in stage_names}
    removed = Counter()
    for stage in stages.values():
        removed.update(stage.get("removed", {}))
    first = next((s for s in stages.values() if "docs_in" in s), {})
    last = next((s for s in reversed(list(stages.values())) if "docs_out" in s), {})
    return {
        "stages": stages,
        "totals": {
            "docs_in": first.get("docs_in", 0), "docs_out": last.get("docs_out", 0),
            "bytes_in": first.get("bytes_in", 0), "bytes_out": last.get("bytes_out", 0),
            "removed": dict(sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))),
            "skipped": sum(sum(s.get("skipped", {}).values()) for s in stages.values()),
        },
    }


def _png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_plots(report: dict, out_dir: str) -> list[str]:
    """PNG plots of the report beside it; returns their paths (a plot with no data is not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        atomic_write_bytes(path, _png(fig))
        plt.close(fig)
        paths.append(path)

    removed = report["totals"]["removed"]
    if removed:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(removed) + 1.2))
        reasons = list(removed)[::-1]
        ax.barh(reasons, [removed[r] for r in reasons])
        ax.set_xlabel("documents removed")
        ax.set_title("Removal reasons")
        save(fig, "removal_reasons.png")
    hist = next((s["quality_hist"] for s in report["stages"].values() if "quality_hist" in s), None)
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 1.0 / len(hist)
        ax.bar([i * width for i in range(len(hist))], hist, width=width, align="edge")
        ax.set_xlabel("quality classifier score")
        ax.set_ylabel("documents")
        ax.set_title("Quality scores (before the Pareto keep)")
        save(fig, "quality_scores.png")
    sizes = next((s["cluster_sizes"] for s in report["stages"].values() if "cluster_sizes" in s), None)
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = sorted(sizes, key=int)
        ax.bar([str(k) for k in keys], [sizes[k] for k in keys])
        ax.set_yscale("log")
        ax.set_xlabel("documents per duplicate cluster")
        ax.set_ylabel("clusters")
        ax.set_title("Dedup cluster sizes")
        save(fig, "dedup_cluster_sizes.png")
    return paths


def log_to_mlflow(report: dict, params: dict, artifacts: list[str], *, tracking_uri: str, run_dir: str,
                  experiment: str, run_name: str | None) -> tuple[str | None, int]:
    """One MLflow run for the build: params, totals and per-stage counts as metrics, files as artifacts.

    Sent through the retrying ``Tracker``: a tracking server that is down costs warnings, never the
    report stage. Returns (run id, or None when no run could be created; calls dropped)."""
    from ...common.tracking import Tracker, default_artifact_root

    tracker = Tracker(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, run_id=None,
                      artifact_root=default_artifact_root(tracking_uri, run_dir))
    tracker.log_params({key[:250]: value for key, value in params.items()})
    metrics = {f"total.{k}": v for k, v in report["totals"].items() if isinstance(v, (int, float))}
    for reason, count in report["totals"]["removed"].items():
        metrics[f"removed.{reason}"] = count
    for name, stage in report["stages"].items():
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds"):
            if key in stage:
                metrics[f"{name}.{key}"] = stage[key]
    tracker.log_metrics(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.close()
    return tracker.run_id, tracker.dropped


def write_report(work_dir: str, out_dir: str, stage_names: list[str]) -> tuple[dict, list[str]]:
    report = build_report(work_dir, stage_names)
    path = os.path.join(out_dir, "report.json")
    atomic_write_json(path, report)
    return report, [path] + write_plots(report, out_dir)
