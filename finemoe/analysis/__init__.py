"""``finemoe analyze``: the measurements the four papers argue from.

- activation sparsity (Finedeep): per-layer histograms and NSAR curves of the
  activation function's output and of the gated product, for every kind alike;
- expert load and specialisation (routed kinds): token share per expert, load
  imbalance (max/mean), router entropy, unused experts, dropped tokens;
- active-expert pattern (DSMoE): share of active blocks per layer and source, mean
  active parameters per token and the FLOPs actually spent;
- routing robustness (CartesianMoE, MoE): perplexity with every token's top-1 expert
  disabled, next to the normal perplexity;
- expert usage (PEER, PKM): usage and unevenness KL(z ‖ uniform) per layer and head,
  and the distribution of retrieval counts.

Layers report through ``finemoe.layers.base.report`` to a ``Recorder``; see
``recorder.py``. Usable from Python (``analyze_model``) and from the CLI.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from finemoe.analysis.recorder import HIST_BINS, HIST_RANGE, NSAR_THRESHOLDS, Recorder, kl_to_uniform

__all__ = [
    "Recorder",
    "NSAR_THRESHOLDS",
    "record",
    "summarize",
    "analyze_model",
    "routing_robustness",
    "disabled_top1",
    "text_batches",
    "analyze_checkpoint",
    "DSMOE_SOURCES",
]

DSMOE_SOURCES = ("hellaswag", "piqa", "arc_easy", "sciq", "lambada")


def record(model: nn.Module, batches: Iterable[Tensor], *, device, autocast=None, progress: bool = True,
           desc: str = "analyze") -> Recorder:
    """Run ``model`` over ``batches`` (token windows ``(B, T+1)`` or inputs ``(B, T)``) in
    eval mode with a recorder attached; returns the filled recorder."""
    from tqdm import tqdm

    recorder = Recorder()
    was_training = model.training
    model.eval()
    with recorder.attach(model), torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = torch.as_tensor(batch).to(device)
            with autocast or _nullcontext():
                model(batch)
    model.train(was_training)
    return recorder


@contextmanager
def _nullcontext():
    yield


# -- summaries --------------------------------------------------------------------------------------


def _f(x) -> float:
    return float(x) if not isinstance(x, Tensor) else float(x.item())


def summarize(recorder: Recorder, model: nn.Module | None = None) -> dict:
    """JSON-ready per-layer metrics from a filled recorder."""
    layers: dict[str, dict] = {}
    edges = torch.linspace(*HIST_RANGE, HIST_BINS + 1).tolist()
    for layer, st in sorted(recorder.stats.items(), key=lambda kv: _layer_key(kv[0])):
        out: dict = {}
        for name in ("act", "gated"):
            if f"{name}/count" in st:
                count = _f(st[f"{name}/count"])
                out[f"nsar_{name}"] = {str(t): _f(e) / count for t, e in zip(recorder.thresholds, st[f"{name}/exceed"])}
                out[f"hist_{name}"] = {"edges": edges, "counts": st[f"{name}/hist"].tolist(),
                                       "below": _f(st[f"{name}/below"]), "above": _f(st[f"{name}/above"]),
                                       "total": count}
        if "route/slot_counts" in st:
            counts = st["route/slot_counts"].cpu()
            share = counts / counts.sum().clamp_min(1)
            tokens = _f(st["route/tokens"])
            out["routing"] = {
                "token_share": share.tolist(),
                "imbalance": _f(share.max() / share.mean()),
                "router_entropy": _f(st["route/entropy_sum"]) / tokens,
                "max_entropy": math.log(len(share)),
                "unused_expert_share": _f((counts == 0).double().mean()),
                "mean_router_prob": (st["route/prob_sum"].cpu() / tokens).tolist(),
                "tokens": tokens,
            }
            if "route/dropped_tokens" in st:
                out["routing"]["dropped_token_share"] = _f(st["route/dropped_tokens"]) / tokens
        if "dsmoe/active_counts" in st:
            per_block = (st["dsmoe/active_counts"].cpu() / _f(st["dsmoe/tokens"]))
            out["dsmoe"] = {"active_share": _f(per_block.mean()), "active_share_per_block": per_block.tolist()}
        fd = sorted(k for k in st if k.startswith("finedeep/gate_sum/"))
        if fd:
            out["finedeep"] = {"gate_mean": [
                (st[k].cpu() / _f(st[k.replace("gate_sum", "tokens")])).tolist() for k in fd]}
        if "pk/mass" in st:
            mass = st["pk/mass"].cpu()
            total = mass.sum(0)
            counts = st["pk/count"].cpu()
            out["product_keys"] = {
                "num_experts": int(total.numel()),
                "usage": _f((total > 0).double().mean()),
                "unevenness_kl": kl_to_uniform(total),
                "usage_per_head": [(m > 0).double().mean().item() for m in mass],
                "unevenness_kl_per_head": [kl_to_uniform(m) for m in mass],
                "retrieval_count_hist": _log_hist(counts),
                "tokens": _f(st["pk/tokens"]),
            }
        layers[layer] = out
    summary: dict = {"layers": layers, "thresholds": list(recorder.thresholds)}
    summary["model"] = _model_level(layers, recorder)
    if model is not None:
        summary["compute"] = _compute_spent(model, layers)
    return summary


def _layer_key(name: str):
    head, _, sub = name.partition("/")
    return int(head.replace("layer", "")), sub


def _log_hist(counts: Tensor) -> dict:
    """How many experts were retrieved 0, 1, 2-3, 4-7, ... times."""
    c = counts.double()
    edges = [0, 1, 2]
    while edges[-1] <= c.max().item():
        edges.append(edges[-1] * 2)
    hist = [int(((c >= lo) & (c < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    return {"edges": edges, "experts": hist}


def _model_level(layers: dict, recorder: Recorder) -> dict:
    out = {}
    for name in ("act", "gated"):
        counts = [(recorder.stats[l][f"{name}/count"], recorder.stats[l][f"{name}/exceed"]) for l in layers
                  if f"{name}/count" in recorder.stats[l]]
        if counts:
            total = sum(_f(c) for c, _ in counts)
            exceed = sum(e.cpu() for _, e in counts)
            out[f"nsar_{name}"] = {str(t): _f(e) / total for t, e in zip(recorder.thresholds, exceed)}
    return out


def _compute_spent(model: nn.Module, layers: dict) -> dict:
    """Mean active parameters and forward FLOPs per token as measured: each layer's
    design says what its tokens spent (``FFNConfig.measured_cost``; DSMoE counts only its
    active blocks, the sparse inference path)."""
    cfg = model.config
    d = cfg.d_model
    active = cfg.num_active_params()
    flops = cfg.flops_per_token()
    for i, ffn in enumerate(cfg.layer_ffns()):
        spent_params, spent_flops = ffn.measured_cost(layers.get(f"layer{i}", {}), d)
        active += spent_params - ffn.num_active_params(d)
        flops += spent_flops - ffn.flops_per_token(d)
    return {"active_params_per_token": active, "configured_active_params": cfg.num_active_params(),
            "forward_flops_per_token": flops, "configured_forward_flops": cfg.flops_per_token()}


# -- robustness -------------------------------------------------------------------------------------------


@contextmanager
def disabled_top1(model: nn.Module) -> Iterator[int]:
    """Every routed layer that supports it (``moe``, CartesianMoE's two sub-layers, any
    layer listing the intervention) routes each token past its top-1 expert; yields how
    many layers were switched. A run-time intervention of the layers
    (``finemoe.layers.intervention``): their configs are not touched."""
    from finemoe.layers import intervention

    with intervention(model, "disable_top1") as reached:
        yield reached


def routing_robustness(model, shards, *, seq_len: int, batch_size: int, max_batches: int | None, device,
                       autocast=None) -> dict:
    from finemoe.evaluate import evaluate_perplexity

    def ppl() -> float:
        with torch.no_grad(), autocast or _nullcontext():
            return evaluate_perplexity(model, shards, split="val", seq_len=seq_len, batch_size=batch_size,
                                       max_batches=max_batches, device=device, progress=False)["perplexity"]

    model.eval()
    normal = ppl()
    with disabled_top1(model) as switched:
        if switched == 0:
            return {"routed_layers": 0}
        broken = ppl()
    return {"routed_layers": switched, "perplexity": normal, "perplexity_top1_disabled": broken}


# -- sources ---------------------------------------------------------------------------------------------------


def text_batches(texts: Iterable[str], tokenizer, *, seq_len: int, batch_size: int, max_batches: int | None) -> Iterator[Tensor]:
    """Concatenate tokenized texts and cut them into ``(B, seq_len)`` batches."""
    buffer: list[int] = []
    rows: list[list[int]] = []
    emitted = 0
    for text in texts:
        buffer.extend(tokenizer.encode(text).ids)
        while len(buffer) >= seq_len:
            rows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
            if len(rows) == batch_size:
                yield torch.tensor(rows)
                rows, emitted = [], emitted + 1
                if max_batches is not None and emitted >= max_batches:
                    return
    if rows:
        yield torch.tensor(rows)
    elif buffer and emitted == 0:  # a source shorter than one window is still measured
        yield torch.tensor([buffer])


def task_texts(evals_dir, name: str, limit: int | None) -> Iterator[str]:
    """Plain text of an eval set: each context with its gold answer."""
    from finemoe.evaluate import load_task

    for row in load_task(evals_dir, name, limit):
        if "option_contexts" in row:
            yield row["option_contexts"][row["gold"]] + row["continuation"]
        elif "target" in row:
            yield row["context"] + row["target"]
        else:
            yield row["context"] + row["choices"][row["gold"]]


def analyze_model(model, tokenizer, shards, *, seq_len: int, batch_size: int = 16, max_batches: int | None = 20,
                  sources: dict[str, Iterable[str]] | None = None, device="cpu", autocast=None,
                  progress: bool = True) -> dict:
    """Everything for one model: the summary on the validation split, robustness,
    and (for DSMoE layers) the active share per source."""
    val = shards.sequential("val", batch_size, seq_len, max_batches)
    recorder = record(model, (torch.from_numpy(b[:, :-1]) for b in val), device=device, autocast=autocast,
                      progress=progress, desc="analyze val")
    result = summarize(recorder, model)
    result["robustness"] = routing_robustness(model, shards, seq_len=seq_len, batch_size=batch_size,
                                              max_batches=max_batches, device=device, autocast=autocast)
    if sources and _measures_active_share(model.config):
        per_source = {"val": _active_shares(result, model.config)}
        for name, texts in sources.items():
            batches = text_batches(texts, tokenizer, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
            rec = record(model, batches, device=device, autocast=autocast, progress=progress, desc=f"analyze {name}")
            shares = _active_shares(summarize(rec, model), model.config)
            if shares:
                per_source[name] = shares
        result["dsmoe_by_source"] = per_source
    return result


def _measures_active_share(model_config) -> bool:
    """Whether any layer learns its activation per token (DSMoE), so that its active
    share per text source is worth mapping."""
    return any(f.measures_active_share() for f in model_config.layer_ffns())


def _active_shares(summary: dict, model_config) -> dict:
    """Active share per layer, of the layers that measure one."""
    ffns = {f"layer{i}": f for i, f in enumerate(model_config.layer_ffns())}
    return {layer: share for layer, v in summary["layers"].items()
            if layer in ffns and (share := ffns[layer].measured_active_share(v)) is not None}


def analyze_checkpoint(checkpoint, *, data_path=None, batches: int = 20, batch_size: int | None = None,
                       sources=DSMOE_SOURCES, evals_dir=None, limit: int = 300, device: str = "cpu",
                       bf16: bool = False, progress: bool = True) -> dict:
    """``analyze_model`` on a checkpoint file or run folder: its data (or ``data_path``),
    its sequence length, and, for DSMoE models, the eval sets ``sources`` as extra text."""
    from pathlib import Path

    from finemoe.checkpoint import check_data_compatible, load_model
    from finemoe.data import TokenShards, embedded_shards

    model, cfg, tokenizer = load_model(checkpoint, device)
    shards = TokenShards(data_path or cfg.data.path or embedded_shards())
    check_data_compatible(checkpoint, cfg.model.vocab_size, tokenizer, shards)
    shards.check_window("val", cfg.train.seq_len or cfg.model.max_seq_len)
    extra = {}
    if sources and evals_dir and Path(evals_dir).is_dir() and _measures_active_share(cfg.model):
        extra = {s: list(task_texts(evals_dir, s, limit)) for s in sources}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and str(device).startswith("cuda") else None
    result = analyze_model(model, tokenizer, shards, seq_len=cfg.train.seq_len or cfg.model.max_seq_len,
                           batch_size=batch_size or cfg.train.batch_size, max_batches=batches, sources=extra,
                           device=device, autocast=autocast, progress=progress)
    result["checkpoint"] = str(checkpoint)
    result["dtype"] = "bfloat16" if autocast is not None else "float32"
    return result
