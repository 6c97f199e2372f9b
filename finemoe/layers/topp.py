"""``topp``: top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts:
Dynamic Routing in MoE Models"), a baseline of CartesianMoE's robustness table
(METHODS.md §3: 84.42 ppl with every token's top-1 expert disabled, vs 7,568 for
SMoE-Share).

Each token takes experts in order of router probability until their mass reaches p:

    P = softmax(RMSNorm(h) W_r)                     float32
    S = the smallest prefix of experts sorted by P with Σ_{i∈S} P_i ≥ p
    update = Σ_{i∈S} P_i · SwiGLU_i(u)  (+ shared experts)

Losses: the Switch load-balancing loss on the selected slots, and the paper's dynamic
loss ``−Σ_i P_i log P_i`` (the router's entropy, averaged over tokens), which stops
the router from spreading mass to buy more experts.

[choice] At most ``max_experts_per_tok`` experts a token: the layer runs the top
``max_experts_per_tok`` slots of every token and gives the slots past mass p weight 0,
so the work has a fixed size and the dispatch never syncs with the host (the paper
leaves the count unbounded; set the cap to ``num_experts`` for that). [choice] The
kept probabilities are used as they are (``renormalize`` makes them sum to 1).

Shapes: N tokens, D model width, E experts, K the cap on experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from finemoe.config import check
from finemoe.layers import routing
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Routing
from finemoe.layers.common import RMSNorm, SwiGLU, float32_linear, swiglu_params
from finemoe.layers.experts import (ExpertsImpl, SwiGLUExperts, check_shared_experts, dispatch_token_choice,
                                     shared_experts_width)


def top_p_selection(probs_NE: Tensor, threshold: float, max_experts: int, *, skip_top1: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights_NK, idx_NK, kept_NK)``: each token's ``max_experts`` most probable
    experts (past its top-1 with ``skip_top1``), and which of them it keeps: those whose
    preceding mass is still below ``threshold`` (so always the first)."""
    weights_NK, idx_NK = probs_NE.topk(max_experts + int(skip_top1), dim=-1)
    if skip_top1:
        weights_NK, idx_NK = weights_NK[:, 1:], idx_NK[:, 1:]
    mass_before_NK = weights_NK.cumsum(-1) - weights_NK
    return weights_NK, idx_NK, mass_before_NK < threshold


@register_ffn
@dataclass
class TopPConfig(FFNConfig):
    kind: ClassVar[str] = "topp"
    num_experts: int = 16
    expert_intermediate_size: int = 512
    threshold: float = 0.4
    """p: experts are added until their router mass reaches it (the paper's p = 0.4)."""
    max_experts_per_tok: int = 4
    """The cap on experts a token takes [choice]; the layer's compute is sized by it."""
    renormalize: bool = False
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    router_aux_loss_coef: float = 0.01
    dynamic_loss_coef: float = 1e-4
    """Weight of the router-entropy loss [choice; the paper's value depends on the model]."""
    experts_impl: ExpertsImpl = "auto"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_experts", "expert_intermediate_size", "max_experts_per_tok"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(self.max_experts_per_tok <= self.num_experts, "max_experts_per_tok",
              f"{self.max_experts_per_tok} is larger than num_experts ({self.num_experts})")
        check(0 < self.threshold <= 1, "threshold", f"must be in (0, 1], got {self.threshold}")
        check_shared_experts(self)
        check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        check(self.dynamic_loss_coef >= 0, "dynamic_loss_coef", "must be >= 0")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    @property
    def shared_width(self) -> int:
        return shared_experts_width(self)

    def build(self, d_model: int, context: LayerContext | None = None) -> "TopPFFN":
        return TopPFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        experts = self.num_experts * swiglu_params(d_model, self.expert_intermediate_size)
        return d_model + d_model * self.num_experts + experts + swiglu_params(d_model, self.shared_width)

    def num_active_params(self, d_model: int) -> float:
        """The configured maximum (``max_experts_per_tok`` experts); the measured count comes
        from ``finemoe analyze``."""
        return d_model + self._active_matmul_params(d_model)

    def flops_per_token(self, d_model: int) -> float:
        return 2 * self._active_matmul_params(d_model)  # every capped slot is computed

    def _active_matmul_params(self, d_model: int) -> int:
        routed = self.max_experts_per_tok * swiglu_params(d_model, self.expert_intermediate_size)
        return d_model * self.num_experts + routed + swiglu_params(d_model, self.shared_width)


class TopPFFN(FFN):
    def __init__(self, config: TopPConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.router = nn.Linear(d_model, config.num_experts, bias=False)
        self.experts = SwiGLUExperts(config.num_experts, d_model, config.expert_intermediate_size,
                                     impl=config.experts_impl)
        self.shared = SwiGLU(d_model, config.shared_width) if config.shared_width > 0 else None

    def supported_interventions(self) -> tuple[str, ...]:
        return ("disable_top1",) if self.config.max_experts_per_tok < self.config.num_experts else ()

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        cfg = self.config
        B, T, D = h_BTD.shape
        u_ND = self.norm(h_BTD).reshape(B * T, D)
        logits_NE = float32_linear(u_ND, self.router.weight)
        probs_NE = routing.router_probs(logits_NE)
        weights_NK, idx_NK, kept_NK = top_p_selection(probs_NE, cfg.threshold, cfg.max_experts_per_tok,
                                                      skip_top1=self.intervening("disable_top1"))
        weights_NK = weights_NK * kept_NK
        if cfg.renormalize:
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        y_ND = dispatch_token_choice(self.experts, u_ND, weights_NK, idx_NK, stats)
        if self.shared is not None:
            y_ND = y_ND + self.shared(u_ND, stats)
        kept_per_expert_E = torch.zeros(cfg.num_experts, device=u_ND.device).scatter_add_(
            0, idx_NK.reshape(-1), kept_NK.reshape(-1).float())
        aux: dict[str, Tensor] = {}
        if cfg.router_aux_loss_coef > 0:  # Switch: E · Σ f_i P_i over the kept slots
            f_E = kept_per_expert_E / kept_per_expert_E.sum()
            aux["load_balancing"] = cfg.router_aux_loss_coef * cfg.num_experts * torch.sum(f_E * probs_NE.mean(0))
        if cfg.dynamic_loss_coef > 0:
            aux["dynamic"] = cfg.dynamic_loss_coef * routing.router_entropy(probs_NE)
        if stats is not None:  # the slots kept, out of the max_experts_per_tok considered
            stats.add(Routing.of(probs_NE, idx_NK, kept=kept_NK))
        return FFNOutput(update=y_ND.reshape(B, T, D), aux_losses=aux)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
