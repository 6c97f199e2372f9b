"""``dense``: the pre-norm SwiGLU FFN of LLaMA (METHODS.md §0.1), the control for
Finedeep and DSMoE.

    update = SwiGLU(RMSNorm(h)),   SwiGLU(x) = (silu(x W_g) ⊙ (x W_u)) W_d
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from finemoe.config import check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, register_ffn
from finemoe.layers.common import RMSNorm, SwiGLU, swiglu_params


@register_ffn
@dataclass
class DenseConfig(FFNConfig):
    """A SwiGLU FFN of width ``intermediate_size``."""

    kind: ClassVar[str] = "dense"
    intermediate_size: int = 1024
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check(self.intermediate_size > 0, "intermediate_size", f"must be positive, got {self.intermediate_size}")
        check(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")

    def build(self, d_model: int, context: LayerContext | None = None) -> "DenseFFN":
        return DenseFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return d_model + swiglu_params(d_model, self.intermediate_size)

    def num_active_params(self, d_model: int) -> int:
        return self.num_params(d_model)

    def flops_per_token(self, d_model: int) -> int:
        return 2 * swiglu_params(d_model, self.intermediate_size)


class DenseFFN(FFN):
    def __init__(self, config: DenseConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.mlp = SwiGLU(d_model, config.intermediate_size)

    def forward(self, h_BTD: Tensor, *, return_stats: bool = False, context: CallContext | None = None) -> FFNOutput:
        return FFNOutput(update=self.mlp(self.norm(h_BTD)), stats={} if return_stats else None)

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.mlp.init_weights(std, out_std)
