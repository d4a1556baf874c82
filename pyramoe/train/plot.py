"""PNG plots of a run directory's metrics.jsonl: losses, and where each MoE layer sends its tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyramoe.train.metrics import METRICS_FILE, read_metrics, records_of


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png (and expert_load.png for MoE runs) under `out_dir` (default RUN_DIR/plots)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    records = read_metrics(run_dir / METRICS_FILE)
    train, evals = records_of(records, "train"), records_of(records, "eval")
    if not train and not evals:
        raise ValueError(f"{run_dir / METRICS_FILE} has no train or eval records yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = [_loss_plot(plt, train, evals, out / "loss.png")]
    if any(r.get("expert_load") for r in evals):
        written.append(_load_plot(plt, evals, out / "expert_load.png"))
    return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average: per-step losses are noisy at small batch sizes."""
    alpha, out, acc = 2.0 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _loss_plot(plt: Any, train: list[dict], evals: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, ce = [r["step"] for r in train], [r.get("ce", r["loss"]) for r in train]
        ax.plot(steps, ce, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(ce, max(5, len(ce) // 30)), color="tab:blue", label="train (cross-entropy)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_plot(plt: Any, evals: list[dict], path: Path) -> Path:
    """One heatmap per MoE layer: expert (rows) x eval step (columns), share of routed assignments
    relative to a uniform share (1.0 = balanced)."""
    import numpy as np

    layers = sorted({int(k) for r in evals for k in r.get("expert_load", {})})
    fig, axes = plt.subplots(
        1, len(layers), figsize=(3.2 * len(layers) + 1.5, 4), squeeze=False, layout="constrained"
    )
    image = None
    for ax, layer in zip(axes[0], layers):
        rows = [r for r in evals if str(layer) in r.get("expert_load", {})]
        counts = np.array([r["expert_load"][str(layer)] for r in rows], dtype=float)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * counts.shape[1]
        image = ax.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(share.max())),
                          interpolation="nearest")
        ax.set_title(f"block {layer}: drop {rows[-1].get('layer_drop_rate', {}).get(str(layer), 0):.1%}")
        ax.set_xlabel("eval step")
        ticks = list(range(0, len(rows), max(1, len(rows) // 5)))
        ax.set_xticks(ticks, [str(rows[i]["step"]) for i in ticks])
        ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), label="load / uniform share")
    fig.suptitle("expert load (validation batches)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
