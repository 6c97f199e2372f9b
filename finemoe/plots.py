"""Figures from run folders (matplotlib, imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics", "plot_loss_curves"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None,
                     title: str | None = None) -> Path:
    """Training LM loss (thin) and validation loss (markers) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=130)
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else Path(run).name
        color = f"C{i}"
        train = [(r["tokens"], r["lm_loss"]) for r in rows if "lm_loss" in r and "tokens" in r]
        tokens_at = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
        val = [(tokens_at.get(r["step"]), r["val/loss"]) for r in rows if "val/loss" in r and r["step"] in tokens_at]
        if train:
            ax.plot([t / 1e6 for t, _ in train], [v for _, v in train], color=color, lw=0.8, alpha=0.6,
                    label=f"{label} train")
        if val:
            ax.plot([t / 1e6 for t, _ in val], [v for _, v in val], "o-", color=color, ms=4, lw=1.5,
                    label=f"{label} validation")
    # the first few percent of training (loss falling from ln V) would flatten the rest
    later = [v for run in run_dirs for r in read_metrics(run) if "lm_loss" in r and "tokens" in r
             for v in [r["lm_loss"]] if r["step"] >= 0.05 * max(x["step"] for x in read_metrics(run))]
    if later:
        ax.set_ylim(top=max(later) * 1.02)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
