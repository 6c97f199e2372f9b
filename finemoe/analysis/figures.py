"""Figures of ``finemoe analyze`` (matplotlib, Agg backend). Each function takes the
summaries written by ``finemoe.analysis.summarize`` / ``analyze_model``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_analysis_figures", "plot_nsar", "plot_activation_hist", "plot_expert_load", "plot_dsmoe_sources", "plot_robustness",
           "plot_product_key_usage", "plot_perplexity_by_arm", "plot_perplexity_vs_active"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    _plt().close(fig)
    return out


def plot_nsar(summaries: dict[str, dict], out, per_layer: bool = True) -> Path | None:
    """NSAR(τ) of the activation output and of the gated product: one thick line per
    model (all layers pooled) and, with ``per_layer``, thin lines per layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for col, (key, title) in enumerate((("act", "activation output silu(x W_g)"), ("gated", "gated product fed to W_d"))):
        ax = axes[col]
        for i, (label, s) in enumerate(summaries.items()):
            model_level = s["model"].get(f"nsar_{key}")
            if not model_level:
                continue
            taus = [float(t) for t in model_level]
            ax.plot(taus, list(model_level.values()), "o-", color=f"C{i}", lw=2, label=label)
            for layer in s["layers"].values() if per_layer else ():
                if f"nsar_{key}" in layer:
                    ax.plot(taus, list(layer[f"nsar_{key}"].values()), color=f"C{i}", lw=0.6, alpha=0.35)
            drawn = True
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("threshold τ on |value|")
        ax.set_ylabel("NSAR: share of values with |v| > τ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Non-sparse activation rate" + (" (thin: individual layers)" if per_layer else ""), fontsize=11)
    return _save(fig, out) if drawn else None


def plot_activation_hist(summaries: dict[str, dict], out, key: str = "act", rebin: int = 5) -> Path | None:
    """Density of activation values, all layers pooled, log scale. ``rebin`` adjacent
    bins are merged for display (bf16 values sit on a grid coarser than the recorded
    bins above 1, which would otherwise draw a comb)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, (label, s) in enumerate(summaries.items()):
        hists = [l[f"hist_{key}"] for l in s["layers"].values() if f"hist_{key}" in l]
        if not hists:
            continue
        edges = np.array(hists[0]["edges"])[::rebin]
        counts = np.sum([h["counts"] for h in hists], axis=0)
        counts = counts[: (len(counts) // rebin) * rebin].reshape(-1, rebin).sum(1)
        edges = edges[: len(counts) + 1]
        total = sum(h["total"] for h in hists)
        density = counts / total / np.diff(edges)
        density[density == 0] = np.nan  # empty bins (e.g. below SiLU's minimum, -0.278) are not drawn
        ax.step(edges[:-1], density, where="post", color=f"C{i}", label=label)
        drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("silu(x W_g) value" if key == "act" else "gated value silu(x W_g) ⊙ x W_u")
    ax.set_ylabel("density (all layers)")
    ax.set_title("Distribution of activation values", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out) if drawn else None


def plot_expert_load(summary: dict, out, title: str = "") -> Path | None:
    """Heat map: routed layer × expert, colour = share of routed slots."""
    rows = [(name, l["routing"]) for name, l in summary["layers"].items() if "routing" in l]
    if not rows:
        return None
    plt = _plt()
    width = max(len(r["token_share"]) for _, r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, (_, r) in enumerate(rows):
        grid[i, : len(r["token_share"])] = r["token_share"]
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * width, 14), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [f"{n} (imb {r['imbalance']:.2f}, H {r['router_entropy']:.2f})" for n, r in rows],
                  fontsize=8)
    ax.set_xticks(range(width), [str(e) for e in range(width)], fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="share of routed slots")
    ax.set_title(title or "Expert load per layer (imbalance = max/mean, H = router entropy in nats)", fontsize=10)
    return _save(fig, out)


def plot_dsmoe_sources(summary: dict, out, title: str = "") -> Path | None:
    """Heat map: DSMoE layer × source, colour = share of active blocks (the paper's Fig. 3)."""
    by_source = summary.get("active_share_by_source")
    if not by_source:
        return None
    plt = _plt()
    sources = list(by_source)
    layers = list(next(iter(by_source.values())))
    grid = np.array([[by_source[s][l] for s in sources] for l in layers])
    fig, ax = plt.subplots(figsize=(1.8 + 1.0 * len(sources), 1.2 + 0.4 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
    for i in range(len(layers)):
        for j in range(len(sources)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    fig.colorbar(im, ax=ax, label="share of active experts")
    ax.set_title(title or "DSMoE: active experts per layer and source", fontsize=10)
    return _save(fig, out)


def plot_robustness(summaries: dict[str, dict], out) -> Path | None:
    """Validation perplexity, normal and with every token's top-1 expert disabled."""
    rows = [(label, s["robustness"]) for label, s in summaries.items()
            if s.get("robustness", {}).get("routed_layers")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4))
    x = np.arange(len(rows))
    normal = [r["perplexity"] for _, r in rows]
    broken = [r["perplexity_top1_disabled"] for _, r in rows]
    ax.bar(x - 0.2, normal, 0.4, label="normal routing")
    ax.bar(x + 0.2, broken, 0.4, label="top-1 expert disabled")
    for xi, (n, b) in enumerate(zip(normal, broken)):
        ax.text(xi - 0.2, n, f"{n:.1f}", ha="center", va="bottom", fontsize=7)
        ax.text(xi + 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [label for label, _ in rows], fontsize=8)
    if max(broken) > 10 * min(normal):  # the paper's collapses span orders of magnitude
        ax.set_yscale("log")
    ax.set_ylabel("validation perplexity" + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Routing robustness", fontsize=11)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_product_key_usage(summaries: dict[str, dict], out) -> Path | None:
    """For every PEER/PKM layer: how many experts were retrieved 0, 1, 2-3, 4-7, ... times."""
    rows = [(f"{label} {name}", l["product_keys"]) for label, s in summaries.items()
            for name, l in s["layers"].items() if "product_keys" in l]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, (name, pk) in enumerate(rows):
        edges, experts = pk["retrieval_count_hist"]["edges"], pk["retrieval_count_hist"]["experts"]
        x = np.arange(len(experts)) + i * width
        ax.bar(x, np.maximum(experts, 0.8), width,
               label=f"{name}: usage {pk['usage']:.1%}, KL {pk['unevenness_kl']:.2f} (N={pk['num_experts']:,})")
    labels = ["0"] + [f"{lo}" if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in zip(edges[1:-1], edges[2:])]
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=45, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("times an expert was retrieved (over all heads and tokens)")
    ax.set_ylabel("number of experts")
    ax.set_title("Expert retrieval counts", fontsize=11)
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_perplexity_by_arm(rows: list[dict], out, title: str = "") -> Path | None:
    """Validation perplexity of every arm: a bar at the mean over seeds, a dot per seed."""
    if not rows:
        return None
    plt = _plt()
    arms: dict[str, list[float]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r["val_perplexity"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(arms), 4))
    for i, (arm, ppl) in enumerate(arms.items()):
        mean = float(np.mean(ppl))
        ax.bar(i, mean, 0.6, color=f"C{i % 10}", alpha=0.55)
        ax.plot([i] * len(ppl), ppl, "k.", ms=6)
        ax.text(i, mean, f"{mean:.2f}" + (f"\n({len(ppl)} seeds)" if len(ppl) > 1 else ""), ha="center",
                va="bottom", fontsize=7)
    low, high = min(min(v) for v in arms.values()), max(max(v) for v in arms.values())
    ax.set_ylim(max(0.0, low - 0.35 * (high - low) - 1), high + 0.25 * (high - low) + 1)
    ax.set_xticks(range(len(arms)), list(arms), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("validation perplexity")
    ax.set_title((title + ": " if title else "") + "perplexity per arm (dots: seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def plot_perplexity_vs_active(rows: list[dict], out) -> Path | None:
    """Validation perplexity against measured activated parameters per token, one point per run."""
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for r in rows:
        color = colors.setdefault(r["arm"], f"C{len(colors) % 10}")
        ax.plot(r["active_params"] / 1e6, r["val_perplexity"], "o", color=color, ms=7,
                label=r["arm"] if r["arm"] not in ax.get_legend_handles_labels()[1] else None)
        ax.annotate(r["run"], (r["active_params"] / 1e6, r["val_perplexity"]), fontsize=6,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("activated parameters per token (millions, measured)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity against activated parameters", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def write_analysis_figures(summaries: dict[str, dict], out_dir) -> list[Path]:
    """Every figure of ``finemoe analyze`` that the summaries (name → ``analyze_model``
    result) have data for: per model its expert load and, for layers that learn their
    activation (DSMoE), the active share per layer and source; then NSAR, the activation
    histogram, routing robustness and PEER/PKM usage with the models side by side."""
    out_dir = Path(out_dir)
    written = []
    for name, result in summaries.items():
        written.append(plot_expert_load(result, out_dir / f"expert_load_{name}.png", f"{name}: expert load per layer"))
        written.append(plot_dsmoe_sources(result, out_dir / f"dsmoe_sources_{name}.png", f"{name}: active experts"))
    for fname, draw in (("nsar.png", plot_nsar), ("activation_hist.png", plot_activation_hist),
                        ("robustness.png", plot_robustness), ("product_key_usage.png", plot_product_key_usage)):
        written.append(draw(summaries, out_dir / fname))
    return [p for p in written if p]
