"""Plots of the recorder's data, one function a figure, each taking a list of metrics dicts
(what `train` writes to metrics.json) and returning a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

PHASE_COLOURS = {
    "load": "#dbe9f6",
    "generate_before": "#fde9d9",
    "prepare": "#f4f4f4",
    "eval_before": "#eeeeee",
    "train": "#e2f0d9",
    "eval_after": "#eeeeee",
    "generate_after": "#fde9d9",
}


def _where(runs: list[dict]) -> str:
    run = runs[0]
    device = run.get("gpu") or "CPU"
    return f"{run.get('model_type', '')} on {device}"


def memory_timeline(runs: list[dict]) -> Figure:
    """Memory over time, one panel per run, phases shaded."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharey=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        memory = run["memory"]
        for phase in memory["phases"]:
            ax.axvspan(phase["start_s"], phase["end_s"] or phase["start_s"], color=PHASE_COLOURS.get(phase["name"], "#f4f4f4"))
            ax.text(phase["start_s"], 0.02, phase["name"], rotation=90, fontsize=7, transform=ax.get_xaxis_transform(), va="bottom")
        times, values = zip(*memory["samples"]) if memory["samples"] else ([], [])
        ax.plot(times, values, color="#1f4e79", lw=1.5)
        ax.set_title(run["run"], loc="left", fontsize=10)
        ax.set_ylabel("GiB")
    top = max((v for run in runs for _, v in run["memory"]["samples"]), default=1.0)
    axes[0, 0].set_ylim(0, top * 1.1)  # shared by every panel
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"{runs[0]['memory']['label']} — {_where(runs)}", fontsize=11)
    fig.tight_layout()
    return fig


def memory_peaks(runs: list[dict]) -> Figure:
    """Peak memory while training, split into after-load (weights) and training overhead."""
    names = [r["run"] for r in runs]
    loaded = [r["memory_after_load_gib"] or 0 for r in runs]
    peak = [r["peak_train_gib"]["sampled_gib"] or 0 for r in runs]
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 3, 4))
    ax.bar(names, loaded, color="#1f4e79", label="after load (weights, context)")
    ax.bar(names, [max(0.0, p - l) for p, l in zip(peak, loaded)], bottom=loaded, color="#9dc3e6", label="training overhead")
    for i, p in enumerate(peak):
        ax.text(i, p, f"{p:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(runs[0]["memory"]["label"])
    ax.set_title(f"Peak memory while training — {_where(runs)}", fontsize=11)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def losses(runs: list[dict]) -> Figure:
    """Training loss (lines) and held-out eval loss (markers) per run."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        (line,) = ax.plot([h["step"] for h in run["loss_history"]], [h["loss"] for h in run["loss_history"]], label=f"{run['run']} train")
        ax.plot([h["step"] for h in run["eval_history"]], [h["eval_loss"] for h in run["eval_history"]], "o--", color=line.get_color(), label=f"{run['run']} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Loss — {_where(runs)}", fontsize=11)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def throughput(runs: list[dict]) -> Figure:
    """Steady training tokens per second (non-pad tokens, warm-up steps excluded)."""
    names = [r["run"] for r in runs]
    speed = [r.get("steady_tokens_per_second") or r["tokens_per_second"] for r in runs]
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 3, 4))
    ax.bar(names, speed, color="#548235")
    for i, v in enumerate(speed):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("tokens / second")
    ax.set_title(f"Training throughput — {_where(runs)}", fontsize=11)
    fig.tight_layout()
    return fig


FIGURES = {"memory_timeline": memory_timeline, "memory_peaks": memory_peaks, "losses": losses, "throughput": throughput}


def save_all(runs: list[dict], folder) -> list[str]:
    """Write every figure as PNG into `folder`; returns the file names."""
    from pathlib import Path

    written = []
    for name, make in FIGURES.items():
        fig = make(runs)
        path = Path(folder) / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def memory_table(runs: list[dict]) -> str:
    """Markdown: after load, peak training, peak generation (GiB), one column per run."""
    rows = {
        "after load": [r["memory_after_load_gib"] for r in runs],
        "peak during training": [r["peak_train_gib"]["sampled_gib"] for r in runs],
        "peak during generation": [r["peak_generate_gib"]["sampled_gib"] for r in runs],
    }
    lines = [f"| {runs[0]['memory']['label']} | " + " | ".join(r["run"] for r in runs) + " |", "|:--" + "|--:" * len(runs) + "|"]
    lines += [f"| {name} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |" for name, values in rows.items()]
    return "\n".join(lines)
