"""``dense``: the pre-norm SwiGLU FFN of LLaMA (METHODS.md §0.1), the control for
Finedeep and DSMoE.

    update = SwiGLU(RMSNorm(h)),   SwiGLU(x) = (silu(x W_g) ⊙ (x W_u)) W_d
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from finemoe.config import check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.common import RMSNorm, SwiGLU, swiglu_params


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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

    @property
    def is_plain_swiglu(self) -> bool:
        return True

    # LLaMA's MLP is this layer: model.layers.i.mlp.{gate,up,down}_proj
    hf_model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"

    @classmethod
    def from_hf_config(cls, fields: dict[str, Any], norm_eps: float) -> "DenseConfig":
        return cls(intermediate_size=int(fields["intermediate_size"]), norm_eps=norm_eps)

    def hf_export_problem(self) -> str | None:
        return None

    def hf_config(self) -> dict[str, Any]:
        return {"intermediate_size": self.intermediate_size, "mlp_bias": False}

    def weights_from_hf(self, hf_sd, prefix: str) -> dict[str, Tensor]:
        return {"norm.weight": hf_sd[prefix + "post_attention_layernorm.weight"],
                **{f"mlp.{p}.weight": hf_sd[f"{prefix}mlp.{p}.weight"] for p in _PROJECTIONS}}

    def weights_to_hf(self, sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        return {prefix + "post_attention_layernorm.weight": sd["norm.weight"],
                **{f"{prefix}mlp.{p}.weight": sd[f"mlp.{p}.weight"] for p in _PROJECTIONS}}

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

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        return FFNOutput(update=self.mlp(self.norm(h_BTD), stats))

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.mlp.init_weights(std, out_std)
