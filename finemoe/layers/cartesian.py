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

Each sub-layer is a ``moe`` layer (``finemoe.layers.moe``) built from the config's
``sublayer`` section, a full ``MoEConfig``: routing, dispatch, the gated shared expert,
the robustness switch and every other MoE option are the same code as the baseline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.moe import MoEConfig, MoEFFN


PAPER_SUBLAYER = dict(num_experts=16, num_experts_per_tok=2, expert_intermediate_size=256, num_shared_experts=1,
                      shared_mix="gate", router_aux_loss_coef=0.01, router_z_loss_coef=0.0)
"""The sub-layer defaults where they differ from ``moe``'s: the paper's top-2 of N
half-width sub-experts with a gated shared sub-expert, no z-loss."""

_MOE_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig) if f.init)


@register_ffn
@dataclass
class CartesianConfig(FFNConfig):
    """Two sequential ``moe`` sub-layers of one configuration.

    In YAML and overrides the sub-layer's fields may also be written flat
    (``model.ffn.num_experts=8``), as shorthand for ``sublayer.num_experts``; a flat
    field wins over the same field under ``sublayer``. Unset fields take
    ``PAPER_SUBLAYER``'s values, then ``moe``'s defaults."""

    kind: ClassVar[str] = "cartesian"
    sublayer: MoEConfig = dataclasses.field(default_factory=lambda: MoEConfig(**PAPER_SUBLAYER))
    """Sub-layers A and B (identical configs, separate weights): every ``moe`` option
    applies (routing, shared experts, segmentation, scaling, ``experts_impl``,
    ``disable_top1``...); ``num_experts`` is N, the sub-experts per sub-layer (N²
    composite experts), and ``expert_intermediate_size`` half a full expert's width."""

    @classmethod
    def with_sublayer(cls, **fields: Any) -> "CartesianConfig":
        """``CartesianConfig(sublayer=MoEConfig(**(PAPER_SUBLAYER | fields)))``."""
        return cls(sublayer=MoEConfig(**(PAPER_SUBLAYER | fields)))

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        """Flat sub-layer fields (the shorthand, and configs saved before the sub-layer
        was its own section) move under ``sublayer``, over the paper's defaults."""
        data = dict(data)
        flat = {key: data.pop(key) for key in list(data) if key in _MOE_FIELDS}
        given = data.get("sublayer", {})
        if isinstance(given, dict):
            data["sublayer"] = PAPER_SUBLAYER | given | flat
        return data

    def replace(self, **changes: Any) -> "CartesianConfig":
        """Sub-layer fields may be given flat here too (``replace(experts_impl="eager")``)."""
        flat = {key: changes.pop(key) for key in list(changes) if key in _MOE_FIELDS}
        new = dataclasses.replace(self, **changes)
        return dataclasses.replace(new, sublayer=new.sublayer.replace(**flat)) if flat else new

    @property
    def num_composite_experts(self) -> int:
        return self.sublayer.num_experts**2

    def build(self, d_model: int, context: LayerContext | None = None) -> "CartesianFFN":
        return CartesianFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return 2 * self.sublayer.num_params(d_model)

    def num_active_params(self, d_model: int) -> float:
        return 2 * self.sublayer.num_active_params(d_model)

    def flops_per_token(self, d_model: int) -> float:
        return 2 * self.sublayer.flops_per_token(d_model)


class CartesianFFN(FFN):
    def __init__(self, config: CartesianConfig, d_model: int):
        super().__init__()
        self.config = config
        self.sublayers = nn.ModuleList([MoEFFN(config.sublayer, d_model), MoEFFN(config.sublayer, d_model)])  # A, B

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        # each sub-layer's statistics under its name: "A", "B" (analysis: layer3/A, layer3/B)
        a_stats, b_stats = (None, None) if stats is None else (stats.within("A"), stats.within("B"))
        a = self.sublayers[0](h_BTD, stats=a_stats, context=context)             # MoE_A(RMSNorm_A(h))
        b = self.sublayers[1](h_BTD + a.update, stats=b_stats, context=context)  # MoE_B(RMSNorm_B(h'))
        aux = {name: a.aux_losses[name] + b.aux_losses[name] for name in a.aux_losses}
        return FFNOutput(update=a.update + b.update, aux_losses=aux)  # out − h

    def init_weights(self, std: float, out_std: float) -> None:
        for sublayer in self.sublayers:
            sublayer.init_weights(std, out_std)
