"""Figures from a run's metrics.jsonl: loss curves, the layer x expert load heatmap and the mean
number of active experts per layer (as the AdaMoLE paper's Figures 2-3).

    python launch/plot.py runs/default            # writes runs/default/plots/*.png
"""

from __future__ import annotations

import re
from pathlib import Path

from adamole_dist.run_files.metrics_log import read_metrics


def block_index(name: str) -> tuple[int, str]:
    """Sort key of a module name by its transformer block number (the last numeric component)."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return (int(numbers[-1]) if numbers else -1, name)


def short_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'L3 q_proj'; BERT 'attention.output.dense' -> 'L3 o'."""
    block, _ = block_index(name)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("attention.output.dense"):
        leaf = "attn.out"
    return f"L{block} {leaf}" if block >= 0 else leaf


def routing_layers(records: list[dict]) -> tuple[dict, str]:
    """Per-layer routing statistics of the last eval (else the last training window)."""
    for kind in ("eval", "train"):
        with_layers = [r for r in records if r["kind"] == kind and r.get("layers")]
        if with_layers:
            return with_layers[-1]["layers"], f"{kind} at step {with_layers[-1]['step']}"
    return {}, ""


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The run's figures (loss curves; with routing statistics, the layer x expert load heatmap and the
    active experts per layer) as PNGs in ``out_dir`` (default RUN_DIR/plots); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training records")
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run dir gets no empty plots/
    written = [save_figure(plt, plot_losses(plt, train, [r for r in records if r["kind"] == "eval"]),
                           out / "loss.png")]
    layers, source = routing_layers(records)
    if layers:
        names = sorted(layers, key=block_index)
        written.append(save_figure(plt, plot_expert_load(plt, layers, names, source), out / "expert_load.png"))
        written.append(save_figure(plt, plot_active_experts(plt, layers, names, source), out / "active_experts.png"))
    return written


def save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(plt, train: list[dict], evals: list[dict]):
    """Task and aux loss over the steps (two axes); beside them, the held-out accuracy where evaluated."""
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["task_loss"] for r in train], label="task loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("task loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["aux_loss"] for r in train], color="tab:orange", alpha=0.7, label="aux loss")
    ax2.set_ylabel("aux loss (unscaled)")
    ax.set_title("training loss")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    if evals:
        axes[0, 1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o")
        axes[0, 1].set_xlabel("optimizer step")
        axes[0, 1].set_ylabel("held-out accuracy")
        axes[0, 1].set_ylim(0, 1)
        axes[0, 1].set_title("evaluation")
    return fig


def plot_expert_load(plt, layers: dict, names: list[str], source: str):
    """Each layer's share of routed pairs per expert, as a heatmap."""
    import numpy as np

    load = np.array([layers[n]["expert_load"] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * load.shape[1], 1.5 + 0.28 * len(names)))
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    ax.set_xticks(range(load.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(f"expert load share per layer ({source})", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routed pairs")
    return fig


def plot_active_experts(plt, layers: dict, names: list[str], source: str):
    """Mean active experts per token, one bar per layer in model order."""
    active = [layers[n]["mean_active_experts"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4))
    ax.bar(range(len(names)), active, color="tab:blue")
    ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("mean active experts per token")
    ax.set_title(f"active experts by layer ({source})", fontsize=9)
    return fig
