"""Weight conversion between Hugging Face checkpoints (LLaMA, Mixtral) and finemoe.

These are pure functions on configs and state dicts, so they work on a checkpoint
read from disk as well as on a live ``transformers`` model (``transformers`` is only
needed by the caller that builds one). Both the 4.x layout of Mixtral experts
(``block_sparse_moe.experts.{j}.w1/w2/w3``) and the fused 5.x layout
(``mlp.experts.gate_up_proj`` / ``down_proj``) are read.

Mapping (HF → finemoe, layer i):
    model.embed_tokens                      → embed
    model.layers.i.input_layernorm          → blocks.i.attn_norm
    model.layers.i.self_attn.{q,k,v,o}_proj → blocks.i.attn.{q,k,v,o}_proj
    model.layers.i.post_attention_layernorm, mlp / block_sparse_moe → blocks.i.ffn (the FFN kind's own
        mapping: ``FFNConfig.weights_from_hf`` / ``weights_to_hf``; dense ↔ LLaMA's MLP,
        moe ↔ Mixtral's sparse-MoE block)
    model.norm                              → norm
    lm_head                                 → lm_head (absent when tied)

Which architectures exist is read from the registry: a kind declares its
``hf_model_type`` (``llama``, ``mixtral``), the FFN fields of its ``config.json`` and how
its weights map; nothing here names a design.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from finemoe.config import ConfigError
from finemoe.layers import FFN_KINDS, FFNConfig
from finemoe.layers.moe import mixtral_experts_from_hf
from finemoe.model import ModelConfig, Transformer

__all__ = [
    "check_hf_config",
    "model_config_from_hf",
    "state_dict_from_hf",
    "state_dict_to_hf_llama",
    "state_dict_to_hf",
    "hf_architecture",
    "hf_config_for",
    "from_hf",
    "mixtral_experts_from_hf",
    "split_dense_ffn",
    "convert_dense_ffns",
    "prune_dense_ffns",
    "channel_importance",
    "PRUNING_CRITERIA",
    "conversions",
    "calibration_batches",
    "convert_model",
]


def _get(hf_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _rope_theta(hf_config: Any) -> float:
    params = _get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError("rope_scaling", f"rope type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)))


# Every field of an imported LLaMA / Mixtral config is read below, ignored because it
# does not change what the model computes, or accepted only at the value finemoe
# implements. Any other field is refused by name: dropping one silently (Mixtral's
# ``sliding_window``, say) would give a model that computes something else.
_MODEL_FIELDS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_theta", "rope_parameters", "rope_scaling", "hidden_act", "attention_bias", "mlp_bias",
}


def _hf_kinds() -> dict[str, type[FFNConfig]]:
    """transformers ``model_type`` → the FFN kind of that architecture (the registry's)."""
    return {cls.hf_model_type: cls for cls in FFN_KINDS.values() if cls.hf_model_type}


def _read_fields() -> set[str]:
    return _MODEL_FIELDS.union(*(cls.hf_config_fields for cls in _hf_kinds().values()))
_IGNORED_FIELDS = {  # metadata, token ids, and settings of initialisation, caching, outputs and generation
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "output_router_logits",
    "chunk_size_feed_forward", "is_encoder_decoder", "initializer_range", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "unk_token_id", "_model_name_or_path", "pretraining_tp",  # pretraining_tp: unused by transformers' LLaMA
}
_NEUTRAL_VALUES = {  # supported only at these values
    "sliding_window": (None,),
    "attention_dropout": (0, 0.0),
    "router_jitter_noise": (0, 0.0),
}
def _config_fields(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    fields = hf_config.to_dict()
    try:  # the generic fields of any transformers config (generation settings in 4.x, ...)
        from transformers import PretrainedConfig

        generic = PretrainedConfig().to_dict()
        read = _read_fields()
        fields = {k: v for k, v in fields.items() if k not in generic or k in read or k in _NEUTRAL_VALUES}
    except ImportError:
        pass
    return fields


def check_hf_config(hf_config: Any) -> None:
    """Refuse, by name, any field of a HF config that finemoe cannot reproduce."""
    fields = _config_fields(hf_config)
    model_type = fields.get("model_type")
    if model_type not in _hf_kinds():
        raise ConfigError("model_type", f"cannot convert {model_type!r}; supported: {', '.join(sorted(_hf_kinds()))}")
    for name in ("attention_bias", "mlp_bias"):
        if fields.get(name):
            raise ConfigError(name, "biases in attention or MLP are not supported")
    if fields.get("hidden_act", "silu") != "silu":
        raise ConfigError("hidden_act", f"only SwiGLU (silu) FFNs are supported, got {fields['hidden_act']!r}")
    for name, value in fields.items():
        if name in _read_fields() or name in _IGNORED_FIELDS:
            continue
        if name in _NEUTRAL_VALUES:
            if value not in _NEUTRAL_VALUES[name]:
                allowed = " or ".join(repr(v) for v in _NEUTRAL_VALUES[name][:1])
                raise ConfigError(name, f"{value!r} is not supported (finemoe implements only {allowed})")
            continue
        raise ConfigError(name, f"unknown to finemoe's {model_type} converter (value {value!r}); "
                                "refused rather than dropped, since it may change what the model computes")


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """A finemoe ``ModelConfig`` equivalent to a HF ``LlamaConfig`` or ``MixtralConfig``
    (an object or its ``config.json`` as a dict). Fields finemoe cannot reproduce are
    refused by name (``check_hf_config``)."""
    check_hf_config(hf_config)
    model_type = _get(hf_config, "model_type")
    eps = float(_get(hf_config, "rms_norm_eps"))
    d_model = int(_get(hf_config, "hidden_size"))
    n_heads = int(_get(hf_config, "num_attention_heads"))
    ffn = _hf_kinds()[model_type].from_hf_config(_config_fields(hf_config), eps)
    return ModelConfig(
        vocab_size=int(_get(hf_config, "vocab_size")),
        d_model=d_model,
        n_layers=int(_get(hf_config, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(_get(hf_config, "num_key_value_heads") or n_heads),
        head_dim=int(_get(hf_config, "head_dim") or d_model // n_heads),
        max_seq_len=int(_get(hf_config, "max_position_embeddings", 2048)),
        rope_theta=_rope_theta(hf_config),
        norm_eps=eps,
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        ffn=ffn,
    )


def state_dict_from_hf(hf_sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A finemoe state dict from a HF checkpoint's (LLaMA, Mixtral: each FFN kind maps its own
    layer's weights)."""
    sd: dict[str, Tensor] = {"embed.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"]}
    if not config.tie_embeddings:
        sd["lm_head.weight"] = hf_sd["lm_head.weight"]
    for i, ffn in enumerate(config.layer_ffns()):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        sd[dst + "attn_norm.weight"] = hf_sd[src + "input_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{dst}attn.{proj}.weight"] = hf_sd[f"{src}self_attn.{proj}.weight"]
        sd.update({f"{dst}ffn.{key}": value for key, value in ffn.weights_from_hf(hf_sd, src).items()})
    return sd


def hf_architecture(config: ModelConfig) -> type[FFNConfig]:
    """The FFN kind whose transformers architecture computes ``config``'s model: every FFN
    of that kind, computing what the architecture's FFN does, with one ``config.json``
    for all layers (LLaMA: one width; Mixtral: one expert shape); anything else is
    refused by name."""
    ffns = config.layer_ffns()
    kinds = {type(f) for f in ffns}
    problems = sorted({p for f in ffns if (p := f.hf_export_problem())})
    if len(kinds) == 1 and not problems and all(f.hf_config() == ffns[0].hf_config() for f in ffns):
        return kinds.pop()
    names = ", ".join(sorted(f"{cls.kind} ({cls.hf_architecture})" for cls in _hf_kinds().values()))
    why = f": {'; '.join(problems)}" if problems else ""
    raise ConfigError("model.ffn", f"a model of {', '.join(sorted({f.kind for f in ffns}))} FFNs has no transformers "
                                   f"architecture{why}; export maps a model whose every FFN is one of {names}, with "
                                   "the same shape in every layer")


def hf_config_for(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the equivalent transformers model (``LlamaForCausalLM``,
    ``MixtralForCausalLM``: ``hf_architecture`` says which, or refuses)."""
    kind = hf_architecture(config)
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    return {"architectures": [kind.hf_architecture], "model_type": kind.hf_model_type, "attention_bias": False,
            **config.layer_ffns()[0].hf_config(), **common}


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The inverse of ``state_dict_from_hf`` (``hf_architecture`` says which architecture,
    or refuses); each FFN kind writes its own layer's keys."""
    hf_architecture(config)
    hf = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    hf["lm_head.weight"] = sd["embed.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    for i, ffn in enumerate(config.layer_ffns()):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        hf[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hf[f"{dst}self_attn.{proj}.weight"] = sd[f"{src}attn.{proj}.weight"]
        layer_sd = {k[len(src) + 4:]: v for k, v in sd.items() if k.startswith(src + "ffn.")}
        hf.update(ffn.weights_to_hf(layer_sd, dst))
    return {k: v.contiguous() for k, v in hf.items()}


def state_dict_to_hf_llama(sd: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """``state_dict_to_hf`` for a model whose FFNs are all dense (refuses any other)."""
    if hf_architecture(config).hf_model_type != "llama":
        raise ConfigError("model.ffn", "only a model whose every FFN is dense can be exported as LLaMA")
    return state_dict_to_hf(sd, config)


def from_hf(hf_model: Any) -> Transformer:
    """A finemoe ``Transformer`` holding the weights of a live HF model (LLaMA, Mixtral)."""
    config = model_config_from_hf(hf_model.config)
    model = Transformer(config)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config), strict=True)
    return model.to(next(hf_model.parameters()).dtype)


# -- dense FFN → DSMoE / LLaMA-MoE (METHODS.md §2) ------------------------------------------


def split_dense_ffn(dense_sd: Mapping[str, Tensor], target: FFNConfig, *, generator: torch.Generator | None = None
                    ) -> dict[str, Tensor]:
    """A dense FFN's weights (``DenseFFN`` keys) as the state dict of ``target``, a kind
    that can be made from a dense FFN: each design says how (``FFNConfig.weights_from_dense``)."""
    return target.weights_from_dense(dict(dense_sd), generator=generator)


def convert_dense_ffns(
    state_dict: Mapping[str, Tensor], config: ModelConfig, target: FFNConfig, *, seed: int = 0
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Convert every dense FFN of a trained model into ``target`` (``dsmoe`` or ``moe``);
    attention, embeddings and norms are kept. Returns the new config and state dict."""
    import dataclasses

    generator = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    for i, ffn in enumerate(config.layer_ffns()):
        if not ffn.is_plain_swiglu:
            continue
        prefix = f"blocks.{i}.ffn."
        layer_sd = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix)}
        for key, value in split_dense_ffn(layer_sd, target, generator=generator).items():
            out[prefix + key] = value
    dense_layers = [i for i, f in enumerate(config.layer_ffns()) if f.is_plain_swiglu]
    kept = [e for e in config.ffn_layers if not e.ffn.is_plain_swiglu]
    if config.ffn.is_plain_swiglu:
        new_config = dataclasses.replace(config, ffn=target, ffn_layers=kept)
    else:
        from finemoe.model import FFNLayers

        new_config = dataclasses.replace(config, ffn_layers=kept + [FFNLayers(dense_layers, target)])
    return new_config, out


PRUNING_CRITERIA = ("activation", "magnitude", "random")


def magnitude_score(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """``‖W_g[:, j]‖ · ‖W_u[:, j]‖ · ‖W_d[j, :]‖`` per hidden channel, from ``nn.Linear``
    weights ``(F, D)``, ``(F, D)``, ``(D, F)``."""
    return w_gate.float().norm(dim=1) * w_up.float().norm(dim=1) * w_down.float().norm(dim=0)


@torch.no_grad()
def channel_importance(model: Transformer, criterion: str, batches=(), *, seed: int = 0) -> dict[int, Tensor]:
    """A score per hidden channel of every dense FFN (layer index → ``(F,)``), the larger
    the more the channel matters:

    - ``activation`` (activation-aware, in the spirit of Wanda / FLAP for structured
      pruning): ``‖h_j‖₂ · ‖W_d[:, j]‖₂`` with ``h = silu(x W_g) ⊙ (x W_u)`` over the
      calibration ``batches`` (token ids ``(B, T)``): the size of what channel j adds to
      the layer's output on real text. It keeps the channels a pretrained model relies
      on (those of the first and last layers carry large activations).
    - ``magnitude``: ``‖W_g[:, j]‖ · ‖W_u[:, j]‖ · ‖W_d[j, :]‖`` from the weights alone;
      on a pretrained LLM it can be worse than random (issue 14: SmolLM2 at 90% kept,
      perplexity 4,362 vs 41 for random channels).
    - ``random``: the sanity floor any criterion must beat."""
    dense = {i: block.ffn for i, block in enumerate(model.blocks) if block.ffn.config.is_plain_swiglu}
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {i: torch.rand(f.config.intermediate_size, generator=generator) for i, f in dense.items()}
    if criterion == "magnitude":
        return {i: magnitude_score(f.mlp.gate_proj.weight, f.mlp.up_proj.weight, f.mlp.down_proj.weight)
                for i, f in dense.items()}
    if criterion != "activation":
        raise ConfigError("criterion", f"unknown pruning criterion {criterion!r}; one of {', '.join(PRUNING_CRITERIA)}")
    squares = {i: torch.zeros(f.config.intermediate_size, dtype=torch.float64) for i, f in dense.items()}

    def hook(i):
        def record(module, args):
            squares[i] += args[0].detach().double().pow(2).reshape(-1, args[0].shape[-1]).sum(0).cpu()
        return record

    handles = [f.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, f in dense.items()]
    seen = 0
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(torch.as_tensor(batch, device=device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ConfigError("calibration", "the activation criterion needs calibration data (no batch was given)")
    return {i: squares[i].sqrt().float() * f.mlp.down_proj.weight.float().norm(dim=0).cpu() for i, f in dense.items()}


def prune_dense_ffns(
    state_dict: Mapping[str, Tensor], config: ModelConfig, keep_fraction: float,
    scores: Mapping[int, Tensor] | None = None,
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Channel pruning of every dense FFN (the pruning baseline of DSMoE, METHODS.md §2):
    keep the ``round(keep_fraction · F)`` hidden channels of largest score (in their
    original order). ``scores`` (layer → ``(F,)``) come from ``channel_importance``;
    without them, the weight-magnitude score ``‖W_g[:, j]‖ · ‖W_u[:, j]‖ · ‖W_d[j, :]‖``."""
    import dataclasses

    from finemoe.model import FFNLayers

    if not 0 < keep_fraction <= 1:
        raise ConfigError("keep_fraction", f"must be in (0, 1], got {keep_fraction}")
    out = dict(state_dict)
    new_layers = []
    for i, ffn in enumerate(config.layer_ffns()):
        if not ffn.is_plain_swiglu:
            new_layers.append(ffn)
            continue
        prefix = f"blocks.{i}.ffn.mlp."
        w_g, w_u, w_d = (out[prefix + f"{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        score = scores[i] if scores is not None else magnitude_score(w_g, w_u, w_d)
        kept = max(1, round(keep_fraction * ffn.intermediate_size))
        channels = score.topk(kept).indices.sort().values
        out[prefix + "gate_proj.weight"] = w_g[channels].contiguous()
        out[prefix + "up_proj.weight"] = w_u[channels].contiguous()
        out[prefix + "down_proj.weight"] = w_d[:, channels].contiguous()
        new_layers.append(dataclasses.replace(ffn, intermediate_size=kept))
    first = new_layers[0]
    exceptions = [FFNLayers([i], f) for i, f in enumerate(new_layers) if f != first]
    return dataclasses.replace(config, ffn=first, ffn_layers=exceptions), out


# -- one interface for convert, study ---------------------------------------------------------------------


WEIGHT_PRUNINGS = ("prune", "sparsegpt")
"""Conversions that keep the dense FFN and prune its weights (channels, or single weights)."""


def conversions() -> tuple[str, ...]:
    """Every conversion target: the FFN kinds that can be made from a dense FFN (in the
    registry; a kind registered later joins), then the prunings."""
    return tuple(k for k, c in FFN_KINDS.items() if c.converts_from_dense()) + WEIGHT_PRUNINGS



def needs_calibration(to: str, criterion: str = "activation") -> bool:
    """Whether a conversion reads calibration data: activation-aware channel pruning and
    SparseGPT."""
    return to == "sparsegpt" or (to == "prune" and criterion == "activation")


def train_settings_after(to: str) -> dict[str, Any]:
    """``train`` settings that a model converted by ``to`` should train on with: after
    ``sparsegpt`` the pruned FFN weights stay zero (``train.keep_zero_weights``), or
    recovery training would fill them again. ``finemoe convert`` writes them into the new
    run's config; ``finemoe study`` applies them to the arm."""
    return {"keep_zero_weights": "blocks.*.ffn.mlp.*"} if to == "sparsegpt" else {}


def calibration_batches(shards, tokens: int, window: int, batch_size: int = 8):
    """Token windows ``(B, window)`` from the train split, spread over it, about
    ``tokens`` tokens in all (at least one batch): what the activation criterion reads."""
    shards.check_window("train", window, remedy="use a shorter calibration window")
    count = max(1, tokens // (batch_size * window))
    return (b[:, :-1] for b in shards.sequential("train", batch_size, window, count))


def convert_model(model: Transformer, config: ModelConfig, to: str, *, num_experts: int = 8, top_k: int | None = None,
                  active_share: float | None = None, keep_fraction: float | None = None, threshold: float = 0.5, straight_through: bool = True,
                  sparsity_loss_coef: float = 1.0, criterion: str = "activation", calibration=(),
                  num_sublayers: int = 1, seed: int = 0, pattern: str | None = None,
                  report: dict | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Every dense FFN of a trained model converted (DSMoE and its baselines, METHODS.md
    §2): to a design ``to`` that can be made from a dense FFN (``dsmoe``, ``moe`` as
    LLaMA-MoE, ``finedeep``: each says how in its ``from_dense`` / ``weights_from_dense``,
    taking the options it needs: ``num_experts`` blocks, ``top_k`` or ``active_share``,
    ``threshold``, ``straight_through``, ``sparsity_loss_coef``, ``num_sublayers``), or by
    channel ``prune`` keeping ``keep_fraction`` of the channels by ``criterion``
    (``channel_importance``; ``activation`` reads the ``calibration`` batches), or by
    ``sparsegpt`` (one-shot unstructured pruning of the FFN weights keeping
    ``keep_fraction`` of them, or the n:m ``pattern`` such as ``"2:4"``, on the
    ``calibration`` batches; ``finemoe.sparsegpt``: shapes unchanged, the counts of
    nonzero FFN weights go to ``report``). ``finemoe convert`` and ``finemoe study`` both
    call this. Returns the new model config and state dict."""
    dense = next((f for f in config.layer_ffns() if f.is_plain_swiglu), None)
    if dense is None:
        raise ConfigError("model.ffn", "the model has no dense FFN to convert")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if to in FFN_KINDS:  # a design made from the dense FFN: each design says how
        target = FFN_KINDS[to].from_dense(dense, num_experts=num_experts, top_k=top_k, active_share=active_share,
                                          threshold=threshold, straight_through=straight_through,
                                          sparsity_loss_coef=sparsity_loss_coef, num_sublayers=num_sublayers)
        return convert_dense_ffns(state, config, target, seed=seed)
    if to == "prune":
        if keep_fraction is None:
            raise ConfigError("keep_fraction", "a pruning needs the share of channels to keep")
        return prune_dense_ffns(state, config, keep_fraction, channel_importance(model, criterion, calibration, seed=seed))
    if to == "sparsegpt":
        import copy

        from finemoe.sparsegpt import parse_pattern, sparsegpt_prune_dense_ffns

        shape = parse_pattern(pattern)
        if shape is None and keep_fraction is None:
            raise ConfigError("keep_fraction", "SparseGPT needs the share of FFN weights to keep, or an n:m pattern")
        pruned = copy.deepcopy(model)
        counts = sparsegpt_prune_dense_ffns(pruned, calibration, sparsity=0.0 if shape else 1.0 - keep_fraction,
                                            pattern=shape)
        if report is not None:
            report.update(counts)
        return config, {k: v.detach() for k, v in pruned.state_dict().items()}
    raise ConfigError("convert", f"unknown conversion {to!r}; one of {', '.join(conversions())}")
