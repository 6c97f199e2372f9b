"""``pkm``: product-key memory (Lample et al. 2019), PEER's other baseline (METHODS.md §0.3).

The same retrieval as PEER (``finemoe.layers.peer.ProductKeyRetrieval``), but the
"experts" are value vectors with no per-expert non-linearity:

    f(x) = Σ_heads Σ_{i ∈ top-k} g_i v_i

The PEER paper's PKM baseline: 1024² memories, h = 8, k = 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finemoe.layers.base import CallContext, FFN, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.common import RMSNorm
from finemoe.layers.peer import ProductKeyConfig, ProductKeyRetrieval, fused_experts, runs_fused_experts


@register_ffn
@dataclass
class PKMConfig(ProductKeyConfig):
    kind: ClassVar[str] = "pkm"
    top_k: int = 32

    def build(self, d_model: int, context: LayerContext | None = None) -> "PKMFFN":
        return PKMFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return d_model + self.retrieval_params(d_model) + self.num_experts * d_model

    def num_active_params(self, d_model: int) -> int:
        return d_model + self.retrieval_params(d_model) + self.num_heads * self.top_k * d_model

    def flops_per_token(self, d_model: int) -> int:
        return self.retrieval_flops(d_model) + 2 * self.num_heads * self.top_k * d_model


class PKMFFN(FFN):
    def __init__(self, config: PKMConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.retrieval = ProductKeyRetrieval(config, d_model)
        self.values = nn.Parameter(torch.empty(config.num_experts, d_model))
        self.init_weights(std=0.02, out_std=0.02)

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        B, T, D = h_BTD.shape
        u_ND = self.norm(h_BTD).reshape(B * T, D)
        idx_NHk, gates_NHk = self.retrieval.route(u_ND, stats)
        if runs_fused_experts(self, u_ND, stats):
            y_ND = fused_experts(self.config, u_ND, idx_NHk, gates_NHk, None, self.values, "none")
        else:
            y_ND = F.embedding_bag(
                idx_NHk.reshape(B * T, -1), self.values,
                per_sample_weights=gates_NHk.reshape(B * T, -1).to(self.values.dtype), mode="sum",
            )
        return FFNOutput(update=y_ND.to(h_BTD.dtype).reshape(B, T, D))

    def row_tables(self) -> tuple[nn.Parameter, ...]:
        return (self.values,)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.retrieval.init_weights(std)
        nn.init.normal_(self.values, std=out_std)
