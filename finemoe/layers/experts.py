"""A bank of SwiGLU experts, and the token dispatch that feeds it.

Dispatch is sort-based: every (token, expert) slot is sorted by expert, the tokens
are gathered into one contiguous ``(S, D)`` buffer, each expert runs one matrix
product on its slice, and the weighted results are scattered back with
``index_add_``. No Python loop runs over tokens; the eager path loops over experts
(one GEMM each), which a grouped-GEMM kernel can replace without touching callers.

Shapes: N tokens, S routed slots (N·K for token choice, E·C for expert choice),
D model width, F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finemoe.layers.base import report

__all__ = ["SwiGLUExperts", "dispatch_token_choice", "dispatch_expert_choice"]


class SwiGLUExperts(nn.Module):
    """E independent SwiGLU experts of width F, stored as stacked weights.

    ``w_gate``/``w_up``: ``(E, D, F)``; ``w_down``: ``(E, F, D)``.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.init_weights(std=0.02, out_std=0.02)  # usable standalone; the model re-initialises

    def forward(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """Run expert e on rows ``[offset_e, offset_e + counts_E[e])`` of ``x_SD``
        (rows sorted by expert). Returns ``(S, D)``."""
        splits = counts_E.tolist()  # one host sync per layer, to size the slices
        outputs = []
        for e, x_cD in enumerate(torch.split(x_SD, splits)):
            if x_cD.shape[0] == 0:
                continue
            act_cF = F.silu(x_cD @ self.w_gate[e])
            h_cF = act_cF * (x_cD @ self.w_up[e])
            report(self, "activations", act=act_cF, gated=h_cF)
            outputs.append(h_cF @ self.w_down[e])
        if not outputs:
            return x_SD.new_zeros(x_SD.shape)
        return torch.cat(outputs, dim=0)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}"


def dispatch_token_choice(experts: SwiGLUExperts, x_ND: Tensor, weights_NK: Tensor, idx_NK: Tensor) -> Tensor:
    """``y_n = Σ_k weights[n, k] · expert_{idx[n, k]}(x_n)``, dropless."""
    N, K = idx_NK.shape
    flat_idx_S = idx_NK.reshape(-1)
    order_S = torch.argsort(flat_idx_S, stable=True)          # slots grouped by expert
    token_S = order_S // K                                     # token of each sorted slot
    counts_E = torch.bincount(flat_idx_S, minlength=experts.num_experts)
    y_SD = experts(x_ND[token_S], counts_E)
    y_SD = y_SD * weights_NK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
    return x_ND.new_zeros(x_ND.shape).index_add_(0, token_S, y_SD.to(x_ND.dtype))


def dispatch_expert_choice(experts: SwiGLUExperts, x_ND: Tensor, weights_EC: Tensor, idx_EC: Tensor) -> Tensor:
    """``y_n = Σ_{e: n ∈ chosen(e)} weights[e, n] · expert_e(x_n)``; tokens no expert
    chose get zero update."""
    E, C = idx_EC.shape
    token_S = idx_EC.reshape(-1)                               # already grouped by expert
    counts_E = torch.full((E,), C, dtype=torch.long, device=x_ND.device)
    y_SD = experts(x_ND[token_S], counts_E)
    y_SD = y_SD * weights_EC.reshape(-1).unsqueeze(-1).to(y_SD.dtype)
    return x_ND.new_zeros(x_ND.shape).index_add_(0, token_S, y_SD.to(x_ND.dtype))
