"""Building blocks shared by the model and every FFN kind: RMSNorm and a SwiGLU MLP.

The shape legend of the whole package (suffixes such as ``x_ND``, ``idx_NK``):
B batch, T sequence, N tokens (B·T flattened), D model width, F FFN width, E experts,
K experts per token (in Finedeep, the K experts of a sub-layer, which every token
uses), S routed slots, C tokens per expert, H heads, k experts retrieved per head and
Q query/key width (PEER, PKM), M sub-layers, f and b the width of one expert or block,
n DSMoE's blocks. A module's docstring names the letters it uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finemoe.kernels.skinny_linear import skinny_linear, skinny_linear_applies
from finemoe.kernels.swiglu import fused_swiglu, fused_swiglu_packed, fused_swiglu_wanted
from finemoe.layers.records import Activations, Stats, wants

__all__ = ["RMSNorm", "SwiGLU", "at_least_float32", "float32_linear", "interleave_gate_up", "split_gate_up",
           "swiglu_hidden", "swiglu_hidden_packed", "swiglu_params"]


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to float32 for numerically sensitive math; float64 stays float64
    (so the float64 reference tests see full precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _Float32Linear(torch.autograd.Function):
    """``x Wᵀ + b`` with autocast off in the forward *and* the backward. A product written
    inside ``torch.autocast(enabled=False)`` runs in float32 eagerly, but under
    ``torch.compile`` AOTAutograd traces its backward under the outer autocast state, so
    its gradients came out of bf16 products (relative error ~3e-3 on CPU, exact eagerly;
    tests/test_layers.py)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
            rows_y, rows_x = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = rows_y.t() @ rows_x if ctx.needs_input_grad[1] else None
            grad_b = rows_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def float32_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ + b`` in float32 (float64 stays float64), forward and backward, whatever the
    autocast state and under ``torch.compile``: the router math of every design
    (METHODS.md preamble)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if skinny_linear_applies(x, weight):  # a router's few outputs on a GPU: kernels that stream x once a pass
        y = skinny_linear(x, weight)
        return y if bias is None else y + bias
    return _Float32Linear.apply(x, weight, bias)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight``, computed in float32 (as LLaMA does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            # the same arithmetic, one fused kernel where torch has one (CUDA, torch >= 2.8)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = at_least_float32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def dense_swiglu_weights(dense_sd: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``W_g, W_u (F, D)`` and ``W_d (D, F)`` of a dense FFN's state dict (``DenseFFN``
    keys), the input of every conversion from a dense FFN."""
    return tuple(dense_sd[f"mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))


def fresh_gate(rows: int, d_model: int, like: Tensor, generator: torch.Generator | None = None,
               std: float = 0.02) -> Tensor:
    """A new gate or router ``(rows, D)`` for a layer converted from a dense FFN, drawn
    from N(0, std²) as DSMoE initialises its gates (in ``like``'s dtype)."""
    return torch.randn(rows, d_model, generator=generator, dtype=torch.float32).mul_(std).to(like.dtype)


def swiglu_params(d_model: int, hidden: int) -> int:
    """Parameters of one SwiGLU MLP: W_gate, W_up (D×F) and W_down (F×D)."""
    return 3 * d_model * hidden


def interleave_gate_up(w_gate_EDF: Tensor, w_up_EDF: Tensor) -> Tensor:
    """``(E, D, 2F)`` with the gate's column j at column 2j and the up projection's at
    2j + 1: the layout of ``finemoe.layers.experts.SwiGLUExperts.w_gate_up`` (GPT-OSS's
    ``gate_up_proj``, and the one QuACK's gated GEMM epilogues pair columns in)."""
    E, D, F = w_gate_EDF.shape
    return torch.stack([w_gate_EDF, w_up_EDF], dim=-1).reshape(E, D, 2 * F)


def split_gate_up(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of ``interleave_gate_up``: the even and odd columns of the last axis as
    strided views, for the weight bank and for a product against it alike."""
    return gate_up[..., 0::2], gate_up[..., 1::2]


def swiglu_hidden(gate: Tensor, up: Tensor, stats: Stats | None = None, *,
                  block_scale: Tensor | None = None) -> Tensor:
    """The hidden units of SwiGLU, ``silu(x W_g) ⊙ (x W_u)``, from the two projections
    (Shazeer 2020), times ``block_scale[n, i]`` on block i of the columns if given
    (``(N, n)``, n dividing the width: DSMoE's gates). Every design computes them here,
    so the activation statistics of ``finemoe analyze`` (an ``Activations`` record added
    to ``stats``, before any scale) mean the same for all, and one fused kernel
    (``finemoe.kernels.fused_swiglu``) speeds them all. This formula is its reference,
    the path taken when the activations are recorded, and the one ``torch.compile`` fuses
    with its neighbours."""
    recording = wants(stats, Activations)
    if not recording and fused_swiglu_wanted(gate, block_scale):
        return fused_swiglu(gate, up, block_scale)
    act = F.silu(gate)
    hidden = act * up
    if recording:
        stats.add(Activations.of(act, hidden))
    if block_scale is not None:
        N, n = block_scale.shape
        hidden = (hidden.view(N, n, hidden.shape[-1] // n) * block_scale.to(hidden.dtype).unsqueeze(-1)).view(hidden.shape)
    return hidden


def swiglu_hidden_packed(gate_up: Tensor, stats: Stats | None = None, *,
                         block_scale: Tensor | None = None, interleaved: bool = False) -> Tensor:
    """``swiglu_hidden(gate, up)`` for ``gate_up = [gate | up]`` (last axis), the output
    of one GEMM against the two weights side by side: one wider product instead of two
    (measured faster for narrow experts), read in place by the fused kernel.
    ``interleaved``: gate column j at 2j and up column j at 2j + 1 instead (the output of
    a GEMM against ``SwiGLUExperts.w_gate_up``)."""
    if not wants(stats, Activations) and fused_swiglu_wanted(gate_up, block_scale):
        return fused_swiglu_packed(gate_up, block_scale, interleaved=interleaved)
    gate, up = split_gate_up(gate_up) if interleaved else gate_up.chunk(2, dim=-1)
    return swiglu_hidden(gate, up, stats, block_scale=block_scale)


class SwiGLU(nn.Module):
    """``FFN(x) = (silu(x W_g) ⊙ (x W_u)) W_d`` (Shazeer 2020), no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor, stats: Stats | None = None) -> Tensor:
        # x W_g and x W_u as one product against the two weights side by side: forward one
        # wider GEMM, backward one input-gradient GEMM over both instead of two whose
        # results are added; measured faster for narrow (shared-expert) widths, the same
        # for a dense FFN (benchmarks/NOTES.md, "merged projections")
        gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        return self.down_proj(swiglu_hidden_packed(gate_up, stats))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)
