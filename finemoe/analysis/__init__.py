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

Layers add typed statistics records (``finemoe.layers.records``) when the model runs
with ``return_stats=True``; a ``Recorder`` merges them over batches, and each record
says what it means (``Record.summary``): nothing here knows a design. Usable from
Python (``analyze_model``) and from the CLI.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from finemoe.analysis.recorder import Recorder
from finemoe.layers.records import NSAR_THRESHOLDS

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
    eval mode, collecting every layer's detailed statistics; returns the filled recorder."""
    from tqdm import tqdm

    recorder = Recorder()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = torch.as_tensor(batch).to(device)
            with autocast or _nullcontext():
                recorder.add(model(batch, return_stats=True, detailed_stats=True).layer_stats)
    model.train(was_training)
    return recorder


@contextmanager
def _nullcontext():
    yield


# -- summaries --------------------------------------------------------------------------------------


def summarize(recorder: Recorder, model: nn.Module | None = None) -> dict:
    """JSON-ready per-layer metrics from a filled recorder: each place's records' own
    summaries, and the model-level summaries of each kind of record."""
    layers: dict[str, dict] = {}
    by_kind: dict[type, list] = {}
    for place, store in sorted(recorder.records.items(), key=lambda kv: _layer_key(kv[0])):
        out: dict = {}
        for name in sorted(store):
            out.update(store[name].summary())
            by_kind.setdefault(type(store[name]), []).append(store[name])
        layers[place] = out
    summary: dict = {"layers": layers, "thresholds": list(NSAR_THRESHOLDS)}
    summary["model"] = {k: v for kind, records in by_kind.items() for k, v in kind.model_summary(records).items()}
    if model is not None:
        summary["compute"] = _compute_spent(model, layers)
    return summary


def _layer_key(name: str):
    head, _, sub = name.partition("/")
    return int(head.replace("layer", "")), sub


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
    and, for layers whose activation is learned per token (DSMoE's), the active share
    per text source."""
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
        result["active_share_by_source"] = per_source
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
