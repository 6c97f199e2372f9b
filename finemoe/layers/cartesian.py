"""``cartesian``: CartesianMoE, Cartesian-product routing (arXiv 2410.16077, NAACL 2025),
as specified in METHODS.md §3.

An MoE FFN is replaced by two *sequential* routed MoE sub-layers A and B, so every
effective expert is a composition ``FFN^B_b ∘ FFN^A_a``: with N sub-experts per
sub-layer there are N² composite experts sharing sub-experts group-wise. Per the
authors' released model code:

    h'  = h  + MoE_A(RMSNorm_A(h))
    out = h' + MoE_B(RMSNorm_B(h'))

Each ``MoE_X(z)``: ``p = softmax(z W_X)`` in float32, top-k (k = 2), renormalised
weights, ``r = Σ g_i SwiGLU_i(z)``, sub-expert width half a full expert's; a shared
sub-expert mixed by a learned two-way softmax ``c = softmax(z W_c + b_c)``:
``c_0 · r + c_1 · shared(z)`` [choice: ``shared_mix = "gate" | "add"``, default "gate"].
Switch load balancing per sub-layer [choice: α = 0.01; the paper's value is not public].

Each sub-layer is a ``moe`` layer (``finemoe.layers.moe``), so routing, dispatch, the
gated shared expert and the robustness switch are the same code as the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn

from finemoe.config import check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, register_ffn
from finemoe.layers.experts import ExpertsImpl
from finemoe.layers.moe import MoEConfig, MoEFFN


@register_ffn
@dataclass
class CartesianConfig(FFNConfig):
    kind: ClassVar[str] = "cartesian"
    num_experts: int = 16
    """N sub-experts per sub-layer (N² composite experts)."""
    num_experts_per_tok: int = 2
    """k per sub-layer."""
    expert_intermediate_size: int = 256
    """Sub-expert width: half the width of the corresponding full expert."""
    num_shared_experts: int = 1
    """Shared sub-experts per sub-layer (the paper: 1)."""
    shared_expert_intermediate_size: int | None = None
    """Default: the sub-expert width."""
    shared_mix: Literal["add", "gate"] = "gate"
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    disable_top1: bool = False
    """Routing-robustness test: each token's top-1 expert is disabled in both sub-layers."""
    experts_impl: ExpertsImpl = "auto"
    """How the sub-experts run (see ``moe``)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.sublayer()  # validates every shared field, with this config's field names

    def sublayer(self) -> MoEConfig:
        """The config of sub-layer A (and B, which is identical)."""
        check(self.num_experts > 0, "num_experts", "must be positive")
        return MoEConfig(
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            expert_intermediate_size=self.expert_intermediate_size,
            num_shared_experts=self.num_shared_experts,
            shared_expert_intermediate_size=self.shared_expert_intermediate_size,
            shared_mix=self.shared_mix,
            norm_topk_prob=self.norm_topk_prob,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_z_loss_coef=self.router_z_loss_coef,
            disable_top1=self.disable_top1,
            experts_impl=self.experts_impl,
            norm_eps=self.norm_eps,
        )

    @property
    def num_composite_experts(self) -> int:
        return self.num_experts**2

    def build(self, d_model: int, context: LayerContext | None = None) -> "CartesianFFN":
        return CartesianFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return 2 * self.sublayer().num_params(d_model)

    def num_active_params(self, d_model: int) -> float:
        return 2 * self.sublayer().num_active_params(d_model)

    def flops_per_token(self, d_model: int) -> float:
        return 2 * self.sublayer().flops_per_token(d_model)


class CartesianFFN(FFN):
    def __init__(self, config: CartesianConfig, d_model: int):
        super().__init__()
        self.config = config
        sub = config.sublayer()
        self.sublayers = nn.ModuleList([MoEFFN(sub, d_model), MoEFFN(sub, d_model)])  # A, B

    def forward(self, h_BTD: Tensor, *, return_stats: bool = False, context: CallContext | None = None) -> FFNOutput:
        a = self.sublayers[0](h_BTD, return_stats=return_stats, context=context)            # MoE_A(RMSNorm_A(h))
        b = self.sublayers[1](h_BTD + a.update, return_stats=return_stats, context=context)  # MoE_B(RMSNorm_B(h'))
        aux = {name: a.aux_losses[name] + b.aux_losses[name] for name in a.aux_losses}
        stats = None
        if return_stats:
            stats = {f"A/{k}": v for k, v in a.stats.items()} | {f"B/{k}": v for k, v in b.stats.items()}
        return FFNOutput(update=a.update + b.update, aux_losses=aux, stats=stats)  # out − h

    def init_weights(self, std: float, out_std: float) -> None:
        for sublayer in self.sublayers:
            sublayer.init_weights(std, out_std)
