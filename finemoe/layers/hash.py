"""``hash``: the Hash layer (Roller et al. 2021, "Hash Layers For Large Sparse Models"),
a baseline of CartesianMoE's tables (METHODS.md §3: Base 7.47 ppl vs SMoE-Share 7.37).

Each token goes to one expert chosen by a fixed hash of its token id; there is no
router to learn, so there is no load-balancing loss either (CartesianMoE's robustness
test, ``disable_top1``, removes the hashed expert and leaves the shared ones):

    e_t    = hash(id_t) ∈ {0, …, E−1}
    update = SwiGLU_{e_t}(RMSNorm(h_t))  (+ Σ_shared SwiGLU_s(RMSNorm(h_t)))

[choice] Roller et al.'s best variant, "Random Hash", draws a fixed random table over
the vocabulary. Here the assignment is a fixed multiplicative hash of the id
(Knuth's constant, then multiply-shift into E buckets, salted by ``hash_seed``): as
random and as balanced over a vocabulary, with no table and no dependence on the
vocabulary size. The token ids come from the call context (``CallContext``), which the
model fills for every layer.

Shapes: N tokens, D model width, E experts, F expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from finemoe.config import check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Routing
from finemoe.layers.common import RMSNorm, SwiGLU, swiglu_params
from finemoe.layers.experts import (ExpertsImpl, SwiGLUExperts, check_shared_experts, dispatch_token_choice,
                                     shared_experts_width)

_KNUTH = 2654435761  # 2^32 / golden ratio, odd


def hash_experts(token_ids: Tensor, num_experts: int, seed: int = 0) -> Tensor:
    """The expert of each token id: ``((id · A + seed) mod 2³²) · E / 2³²``, int64."""
    mixed = (token_ids.long() * _KNUTH + seed * 0x9E3779B9) % (1 << 32)
    return (mixed * num_experts) >> 32


@register_ffn
@dataclass
class HashConfig(FFNConfig):
    kind: ClassVar[str] = "hash"
    num_experts: int = 16
    """E: experts; token id t always goes to expert hash(t)."""
    expert_intermediate_size: int = 512
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    """Width of each shared expert; default the expert width."""
    hash_seed: int = 0
    """Salts the hash: another fixed assignment of token ids to experts."""
    experts_impl: ExpertsImpl = "auto"
    """How the experts run (see ``moe``)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check(self.num_experts > 0, "num_experts", f"must be positive, got {self.num_experts}")
        check(self.expert_intermediate_size > 0, "expert_intermediate_size", "must be positive")
        check_shared_experts(self)
        check(self.hash_seed >= 0, "hash_seed", "must be >= 0")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    @property
    def shared_width(self) -> int:
        return shared_experts_width(self)

    def build(self, d_model: int, context: LayerContext | None = None) -> "HashFFN":
        return HashFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        experts = self.num_experts * swiglu_params(d_model, self.expert_intermediate_size)
        return d_model + experts + swiglu_params(d_model, self.shared_width)

    def num_active_params(self, d_model: int) -> int:
        return d_model + swiglu_params(d_model, self.expert_intermediate_size) + swiglu_params(d_model, self.shared_width)

    def flops_per_token(self, d_model: int) -> int:
        return 2 * (swiglu_params(d_model, self.expert_intermediate_size) + swiglu_params(d_model, self.shared_width))


class HashFFN(FFN):
    def __init__(self, config: HashConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.experts = SwiGLUExperts(config.num_experts, d_model, config.expert_intermediate_size,
                                     impl=config.experts_impl)
        self.shared = SwiGLU(d_model, config.shared_width) if config.shared_width > 0 else None

    def supported_interventions(self) -> tuple[str, ...]:
        # A token's hashed expert is its only routed one, its "top-1": disabling it leaves
        # the shared experts (CartesianMoE's robustness test), so only a layer with them
        # can take the test
        return ("disable_top1",) if self.shared is not None else ()

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        cfg = self.config
        if context is None or context.token_ids is None:
            raise ValueError("the hash layer routes by token id: call it with context=CallContext(token_ids=...)")
        B, T, D = h_BTD.shape
        u_ND = self.norm(h_BTD).reshape(B * T, D)
        idx_N1 = hash_experts(context.token_ids.reshape(-1, 1), cfg.num_experts, cfg.hash_seed)
        if self.intervening("disable_top1"):
            y_ND = torch.zeros_like(u_ND)
        else:
            y_ND = dispatch_token_choice(self.experts, u_ND, torch.ones(idx_N1.shape, device=u_ND.device), idx_N1, stats)
        if self.shared is not None:
            y_ND = y_ND + self.shared(u_ND, stats)
        if stats is not None:  # a deterministic router: all mass on the hashed expert
            stats.add(Routing.of(F.one_hot(idx_N1[:, 0], cfg.num_experts).float(), idx_N1))
        return FFNOutput(update=y_ND.reshape(B, T, D))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
