"""PNG charts of a comparison report (orchestrator/tools/compare.py): tokens/s per engine against
tokens/s per user, the seed's axes.

- end-to-end curves, one per deployment, a point per concurrency (labelled `k=N`);
- rate-matched points from the phase sweeps, labelled with their shape (`c2g1`), and
  their Pareto frontier as a dashed line.
Throughput is divided by every engine of the deployment (context and generation), so an
aggregated and a disaggregated deployment of the same size compare fairly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt


def plot_compare(report: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Write the chart of `report` to `path` (PNG) and return it."""
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for name, run in report.get("deployments", {}).items():
        rows = [s for s in run["summaries"] if s["tokens_per_s_per_user"] is not None]
        if not rows:
            continue
        xs = [s["tokens_per_s_per_user"] for s in rows]
        ys = [s["output_tokens_per_s_per_engine"] for s in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} end to end ({run['shape']})")
        for s, x, y in zip(rows, xs, ys):
            ax.annotate(
                f"{'k' if s['mode'] == 'concurrency' else 'rps'}={s['load']:g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    matched = report.get("rate_matching", {})
    points = matched.get("points", [])
    if points:
        ax.scatter([p["tokens_per_s_per_user"] for p in points], [p["tokens_per_s_per_engine"] for p in points],
                   marker="s", color="black", s=18, label="rate-matched (phase sweeps)", zorder=3)  # fmt: skip
        for p in points:
            ax.annotate(f"c{p['context_engines']}g{p['generation_engines']} k={p['concurrency']}",
                        (p["tokens_per_s_per_user"], p["tokens_per_s_per_engine"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)  # fmt: skip
        front = matched.get("pareto", [])
        if front:
            ax.plot([p["tokens_per_s_per_user"] for p in front], [p["tokens_per_s_per_engine"] for p in front],
                    linestyle="--", color="black", linewidth=1, label="rate-matched Pareto frontier")  # fmt: skip
    workload = report.get("workload", {})
    ax.set_title(
        title
        or f"ISL {workload.get('isl', '?')} / OSL {workload.get('osl', '?')}: throughput per engine vs speed per user"
    )
    ax.set_xlabel("output tokens/s per user")
    ax.set_ylabel("output tokens/s per engine (all engines)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_pareto(study: Mapping[str, Any], path: Path, seed_speedup: str = "") -> Path:
    """The simulator's agg-vs-disagg chart of one workload (`orchestrator.sim.study`): every
    point faint, each kind's Pareto frontier as a line, tokens/s per GPU against per user."""
    styles = {"aggregated": ("tab:blue", "o", "-"), "rate-matched": ("tab:orange", "s", "--"),
              "end-to-end": ("tab:green", "^", "-")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for kind, (color, marker, style) in styles.items():
        pts = [p for p in study["points"] if p["kind"] == kind]
        ax.scatter([p["tokens_per_s_per_user"] for p in pts], [p["tokens_per_s_per_gpu"] for p in pts],
                   color=color, marker=marker, alpha=0.25, s=18)  # fmt: skip
        front = study["frontiers"][kind]
        label = {"aggregated": "aggregated (chunked context)", "rate-matched": "disaggregated, rate-matched",
                 "end-to-end": "disaggregated, end to end"}[kind]  # fmt: skip
        ax.plot([p["tokens_per_s_per_user"] for p in front], [p["tokens_per_s_per_gpu"] for p in front],
                color=color, marker=marker, linestyle=style, label=label)  # fmt: skip
        for p in front:
            ax.annotate(p["shape"].replace("ctx ", "c").replace("gen ", "g") + f" k={p['k']}",
                        (p["tokens_per_s_per_user"], p["tokens_per_s_per_gpu"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=color)  # fmt: skip
    speed = study["speedups"].get("rate_matched_speedup")
    measured = f"rate-matched speedup {speed[0]:.2f}-{speed[1]:.2f}x" if speed else ""
    ax.set_title(f"ISL {study['isl']} / OSL {study['osl']}, simulated (Llama-3.1-8B BF16 on H100 cost model)\n"
                 f"{measured}{'; the seed: ' + seed_speedup if seed_speedup else ''}", fontsize=9)  # fmt: skip
    ax.set_xlabel("tokens/s per user")
    ax.set_ylabel("tokens/s per GPU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
