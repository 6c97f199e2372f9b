"""A decoder-only LLaMA-style transformer whose FFNs are pluggable.

RMSNorm pre-norm blocks, rotary position embeddings (the LLaMA/HF "rotate half"
layout), grouped-query attention through ``scaled_dot_product_attention``, optional
tied embeddings. Every block's FFN is built from an ``FFNConfig`` of the registry; the
config can give different kinds to different layers (``ffn_layers``).

The model knows nothing of training: it returns logits, the LM loss when targets
are given, and the sum of the auxiliary losses its FFNs report.

Shapes: B batch, T sequence, D model width, H query heads, G key/value heads,
Hd head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finemoe.config import ConfigError, check
from finemoe.layers import FFN, CallContext, DenseConfig, FFNConfig, LayerContext, Record, Stats
from finemoe.layers.common import RMSNorm
from finemoe.loss import linear_cross_entropy

__all__ = ["FFNLayers", "KVCache", "ModelConfig", "ModelOutput", "Transformer", "select_layers"]


def select_layers(spec: list[int] | str, n_layers: int, field_name: str = "layers") -> list[int]:
    """Resolve a layer selection: a list of indices, ``"all"``, ``"middle"``, or a
    Python slice such as ``"1::2"`` (every other layer, starting at layer 1)."""
    if isinstance(spec, list):
        for i in spec:
            check(0 <= i < n_layers, field_name, f"layer {i} does not exist (n_layers = {n_layers})")
        check(len(set(spec)) == len(spec), field_name, f"lists a layer twice: {spec}")
        return sorted(spec)
    if spec == "all":
        return list(range(n_layers))
    if spec == "middle":
        return [n_layers // 2]
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        bounds = [int(p) if p.strip() else None for p in parts]
        chosen = list(range(n_layers))[slice(*bounds)]
    except ValueError:
        raise ConfigError(
            field_name, f"{spec!r} is not a layer selection (a list, 'all', 'middle' or a slice like '1::2')"
        ) from None
    check(len(chosen) > 0, field_name, f"{spec!r} selects no layer of {n_layers}")
    return chosen


@dataclass
class FFNLayers:
    """Use ``ffn`` in the layers selected by ``layers`` (see ``select_layers``)."""

    layers: list[int] | str
    ffn: FFNConfig


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; default ``n_heads`` (plain MHA)."""
    head_dim: int | None = None
    """Default ``d_model // n_heads``."""
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    ffn: FFNConfig = field(default_factory=DenseConfig)
    """FFN of every layer not selected by an entry of ``ffn_layers``."""
    ffn_layers: list[FFNLayers] = field(default_factory=list)
    """Per-layer exceptions, e.g. ``[{layers: "1::2", ffn: {kind: moe, ...}}]``."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check(self.n_kv_heads > 0, "n_kv_heads", f"must be positive, got {self.n_kv_heads}")
        check(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        if self.head_dim is None:
            check(
                self.d_model % self.n_heads == 0,
                "n_heads",
                f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim",
            )
            self.head_dim = self.d_model // self.n_heads
        check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", f"must be positive and even (RoPE), got {self.head_dim}")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        check(self.init_std > 0, "init_std", "must be positive")
        owner: dict[int, int] = {}
        for j, entry in enumerate(self.ffn_layers):
            for i in select_layers(entry.layers, self.n_layers, f"ffn_layers[{j}].layers"):
                if i in owner:
                    raise ConfigError(f"ffn_layers[{j}].layers", f"layer {i} is already given by ffn_layers[{owner[i]}]")
                owner[i] = j

    # -- per-layer FFNs ------------------------------------------------------------------
    def layer_ffns(self) -> list[FFNConfig]:
        """The FFN config of every layer, in order."""
        ffns = [self.ffn] * self.n_layers
        for entry in self.ffn_layers:
            for i in select_layers(entry.layers, self.n_layers):
                ffns[i] = entry.ffn
        return ffns

    @property
    def couples_sequences(self) -> bool:
        """Whether a sequence's logits depend on the other sequences of its batch (some
        FFN routes among all tokens of the batch; see ``FFNConfig.couples_tokens``)."""
        return any(f.couples_tokens for f in self.layer_ffns())

    # -- accounting ------------------------------------------------------------------------
    def _attention_matmul_params(self) -> int:
        q_and_o = 2 * self.d_model * self.n_heads * self.head_dim
        k_and_v = 2 * self.d_model * self.n_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def param_breakdown(self) -> dict[str, float]:
        """Total and active parameters by part; the FLOP count per token by part."""
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else embed
        attn = self.n_layers * (self.d_model + self._attention_matmul_params())  # + attention norm
        ffns = self.layer_ffns()
        ffn_total = sum(f.num_params(self.d_model) for f in ffns)
        ffn_active = sum(f.num_active_params(self.d_model) for f in ffns)
        return {
            "embedding": embed,
            "lm_head": head,
            "attention": attn,
            "ffn": ffn_total,
            "ffn_active": ffn_active,
            "final_norm": self.d_model,
        }

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        b = self.param_breakdown()
        total = b["embedding"] + b["lm_head"] + b["attention"] + b["ffn"] + b["final_norm"]
        return int(total - (b["embedding"] if exclude_embedding else 0))

    def num_active_params(self, *, exclude_embedding: bool = False) -> float:
        """Parameters one token touches (the embedding table counts in full unless
        excluded; only one row is read)."""
        b = self.param_breakdown()
        total = b["embedding"] + b["lm_head"] + b["attention"] + b["ffn_active"] + b["final_norm"]
        return total - (b["embedding"] if exclude_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token: 2 × MACs of every matrix product (attention
        projections, FFN, LM head) plus attention scores and values at context
        ``seq_len`` (default ``max_seq_len``), counted over the full context as in
        PaLM's MFU convention (causal masking is not discounted). Training ≈ 3×."""
        seq_len = self.max_seq_len if seq_len is None else seq_len
        attn_proj = 2 * self._attention_matmul_params()
        attn_scores = 2 * 2 * self.n_heads * self.head_dim * seq_len  # QKᵀ and AV
        ffn = sum(f.flops_per_token(self.d_model) for f in self.layer_ffns())
        lm_head = 2 * self.vocab_size * self.d_model
        return self.n_layers * (attn_proj + attn_scores) + ffn + lm_head


@dataclass
class ModelOutput:
    """HF-style output. ``loss`` = ``lm_loss`` + ``aux_loss`` when targets are given;
    ``logits`` only when they are not (with targets the loss is computed chunk by chunk,
    and the logits of the whole batch are never formed: ``finemoe.loss``)."""

    logits: Tensor | None
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    """Each auxiliary loss (weighted), summed over layers."""
    layer_stats: list[list[tuple[str, Record]]] | None = None
    """Per layer, the statistics records its FFN added (``(part, record)``; part ``""``
    for the layer itself), when ``return_stats=True``: ``finemoe.layers.records``."""


def rope_cos_sin(positions_T: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(T, Hd)`` for rotary embeddings in float32 (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_T.device, dtype=torch.float32) / head_dim))
    angles_TH = positions_T.float()[:, None] * inv_freq[None, :]
    angles_TH = torch.cat([angles_TH, angles_TH], dim=-1)
    return angles_TH.cos(), angles_TH.sin()


def apply_rope(x_BHTd: Tensor, cos_Td: Tensor, sin_Td: Tensor) -> Tensor:
    """Rotate pairs (i, i + Hd/2): the "rotate half" layout of LLaMA in Hugging Face."""
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    return x_BHTd * cos_Td.to(x_BHTd.dtype) + rotated * sin_Td.to(x_BHTd.dtype)


class LayerCache:
    """Keys and values of one layer for incremental decoding, preallocated."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k_BGTd: Tensor, v_BGTd: Tensor) -> tuple[Tensor, Tensor]:
        T = k_BGTd.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {T} > {self.k.shape[2]} positions")
        self.k[:, :, self.length : self.length + T] = k_BGTd
        self.v[:, :, self.length : self.length + T] = v_BGTd
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class KVCache:
    """One ``LayerCache`` per block; ``Transformer.forward(..., cache=...)`` fills it."""

    def __init__(self, model: "Transformer", batch: int, max_len: int | None = None, dtype=None):
        cfg = model.config
        max_len = max_len or cfg.max_seq_len
        param = next(model.parameters())
        self.layers = [
            LayerCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, param.device, dtype or param.dtype)
            for _ in range(cfg.n_layers)
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos_Td: Tensor, sin_Td: Tensor, cache: "LayerCache | None" = None) -> Tensor:
        B, T, _ = x_BTD.shape
        q_BHTd = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTd = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTd = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd, k_BGTd = apply_rope(q_BHTd, cos_Td, sin_Td), apply_rope(k_BGTd, cos_Td, sin_Td)
        past = 0
        if cache is not None:
            past = cache.length
            k_BGTd, v_BGTd = cache.append(k_BGTd, v_BGTd)  # (B, G, past + T, Hd)
        mask = None
        if past > 0 and T > 1:  # a chunk after a prefix: causal within the chunk, all of the prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
        o_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, is_causal=past == 0 and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)


class Block(nn.Module):
    """``h = x + Attn(RMSNorm(x))``;  ``out = h + FFN(h).update`` (the FFN owns its norm)."""

    def __init__(self, cfg: ModelConfig, ffn_config: FFNConfig, context: LayerContext):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn: FFN = ffn_config.build(cfg.d_model, context)

    def forward(self, x_BTD: Tensor, cos_Td: Tensor, sin_Td: Tensor, return_stats: bool, cache: LayerCache | None = None,
                context: CallContext | None = None, detailed_stats: bool = False):
        """``(output, FFN output, the FFN's statistics records or None)``."""
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_Td, sin_Td, cache)
        stats = Stats(detailed=detailed_stats) if return_stats else None
        out = self.ffn(h_BTD, stats=stats, context=context)
        return h_BTD + out.update, out, None if stats is None else stats.records


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        ffns = config.layer_ffns()
        self.blocks = nn.ModuleList(
            Block(config, f, LayerContext(i, config.n_layers, sum(g.kind == f.kind for g in ffns)))
            for i, f in enumerate(ffns)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for inputs; output projections of attention and FFN
        scaled by 1/sqrt(2·n_layers) (GPT-2), so the residual stream's variance does not
        grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            block.attn_norm.reset_parameters()
            block.attn.init_weights(std, out_std)
            block.ffn.init_weights(std, out_std)
        self.norm.reset_parameters()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)

    def num_params(self) -> int:
        """Counted from the live parameters (a tied table counts once)."""
        return sum(p.numel() for p in self.parameters())

    def row_tables(self) -> list[nn.Parameter]:
        """The FFN layers' parameters read by row index (``FFN.row_tables``)."""
        return [p for block in self.blocks for p in block.ffn.row_tables()]

    def forward(
        self, input_ids: Tensor, targets: Tensor | None = None, *, return_stats: bool = False, cache: KVCache | None = None,
        detailed_stats: bool = False,
    ) -> ModelOutput:
        """``input_ids``: ``(B, T)``. ``targets``: ``(B, T)``, already aligned with the
        next token (``targets[:, t]`` is the token after ``input_ids[:, t]``);
        ``-100`` is ignored. With a ``cache``, the tokens continue the cached ones.
        ``return_stats``: each layer's statistics records in ``layer_stats``;
        ``detailed_stats``: the costly ones too (activation histograms, for
        ``finemoe analyze``; the layers then take their reference paths)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len ({self.config.max_seq_len})")
        cos_Td, sin_Td = rope_cos_sin(
            torch.arange(past, past + T, device=input_ids.device), self.config.head_dim, self.config.rope_theta
        )
        x_BTD = self.embed(input_ids)
        context = CallContext(token_ids=input_ids)
        aux_losses: dict[str, Tensor] = {}
        layer_stats = [] if return_stats else None
        for i, block in enumerate(self.blocks):
            x_BTD, ffn_out, records = block(x_BTD, cos_Td, sin_Td, return_stats,
                                            cache.layers[i] if cache is not None else None, context, detailed_stats)
            for name, value in ffn_out.aux_losses.items():
                aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
            if layer_stats is not None:
                layer_stats.append(records)
        x_BTD = self.norm(x_BTD)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        aux_loss = sum(aux_losses.values()) if aux_losses else torch.zeros((), device=x_BTD.device)
        out = ModelOutput(logits=None, aux_loss=aux_loss, aux_losses=aux_losses, layer_stats=layer_stats)
        if targets is None:
            out.logits = F.linear(x_BTD, weight)
        else:  # the output projection and the loss a chunk of rows at a time (finemoe.loss)
            out.lm_loss = linear_cross_entropy(x_BTD.reshape(B * T, -1), weight, targets.reshape(B * T))
            out.loss = out.lm_loss + aux_loss
        return out

    def extra_repr(self) -> str:
        return f"params={self.num_params():,}"


def build_model(config: ModelConfig | dict[str, Any]) -> Transformer:
    from finemoe.config import from_dict

    if isinstance(config, dict):
        config = from_dict(ModelConfig, config, "model")
    return Transformer(config)
