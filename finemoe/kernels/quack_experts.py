"""Token-choice SwiGLU experts on QuACK's grouped GEMMs, the gather and the gate inside them.

finemoe's ``grouped_mm`` path (``finemoe.layers.experts``) gathers every token's row once
per slot into an ``(S, D)`` buffer, runs PyTorch's CUTLASS grouped GEMMs, applies SwiGLU in
a separate pass, and casts the weight gradients from bf16 to float32. QuACK
(``quack-kernels``, Tri Dao's lab: CuTe-DSL GEMMs for Hopper and Blackwell, the kernels of
SonicMoE) has grouped GEMMs whose A operand is gathered row by row while it is loaded and
whose epilogues do SwiGLU forward and backward. The layout is SonicMoE's (arXiv:2512.14080):

forward, with ``t(p)`` the token of sorted row p and ``s_p`` its routing weight,
    z = x[t] W_gu            (grouped, A gathered; W_gu: gate and up columns interleaved, as
                              ``SwiGLUExperts.w_gate_up`` stores them)
    h = silu(z_gate) ⊙ z_up  (in the same GEMM's epilogue; z is kept for the backward)
    y = h W_d                (grouped)
    out_n = Σ_k s_{n,k} · y[position(n, k)]     (``finemoe.kernels.slots``, fixed order)
backward, with g = ∂L/∂out:
    dh = g[t] W_dᵀ           (grouped, A gathered), and in its epilogue from z:
    ∂L/∂s_p = Σ_f dh_pf h_pf,  dz = SwiGLU'(z) (s_p dh_p),  h_p s_p (for dW_d)
    dW_d,e = (s h)_eᵀ g[t]_e,  dW_gu,e = x[t]_eᵀ dz_e     (grouped over rows, gathered, float32 out)
    dx_n = Σ_k (dz W_guᵀ)[position(n, k)]

so no ``(S, D)`` copy of the input or of the output gradient is ever written, SwiGLU costs
no pass of its own, and the weight gradients are written in float32. QuACK's kernels are
compiled and autotuned on first use (cached on disk with ``QUACK_CACHE_AUTOTUNING=1``) and
need an sm90/sm100 GPU. Each GEMM is a Python call through QuACK's interface, so the path
pays where the step is replayed as CUDA graphs (``train.compile_mode=reduce-overhead``):
compiled without graphs, s120m-cartesian trained at 0.58 of dense's MFU against 0.76 on
grouped_mm, and as graphs at 0.82 against 0.77 (benchmarks/NOTES.md).

Operator → autograd → ``dispatch_token_choice`` when ``experts_impl`` is ``quack`` (opt-in;
``auto`` stays on grouped_mm); the grouped_mm and eager paths are the references it is
tested against (tests/test_gpu.py).

Shapes: N tokens, K slots per token, S = N·K rows sorted by expert, D model width,
F expert width, E experts.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from finemoe.kernels.slots import weighted_sum_slots

__all__ = ["quack_available", "quack_installed", "quack_token_choice"]

try:  # an optional dependency: pip install "finemoe[quack]"
    from quack.gemm_interface import gemm as _gemm
    from quack.gemm_interface import gemm_dgated as _gemm_dgated
    from quack.gemm_interface import gemm_gated as _gemm_gated
except Exception:  # noqa: BLE001  (not installed, or a CUDA toolkit it cannot load: either way, unavailable)
    _gemm = _gemm_gated = _gemm_dgated = None


_TUNED = os.environ.get("FINEMOE_QUACK_TUNED", "1") != "0"
"""Whether QuACK autotunes each GEMM (once per shape and process; ``QUACK_CACHE_AUTOTUNING=1``
keeps the choices on disk). With QuACK's default tiles the layer was slower than the
grouped_mm path (moe E = 8: 3.38 against 2.90 ms), tuned faster (2.71): benchmarks/NOTES.md."""


def quack_installed() -> bool:
    """Whether QuACK (``pip install "finemoe[quack]"``) could be imported."""
    return _gemm is not None


def quack_available(x: Tensor) -> bool:
    """Whether QuACK's kernels can run the experts for ``x``: installed, and ``x`` on an
    sm90/sm100 GPU."""
    return _gemm is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] in (9, 10)


@torch.library.custom_op("finemoe::quack_experts_forward", mutates_args=())
def _forward(x_ND: Tensor, w_gu_ED2F: Tensor, w_down_EFD: Tensor, weight_NK: Tensor, token_S: Tensor,
             position_S: Tensor, cu_E1: Tensor) -> tuple[Tensor, Tensor]:
    z_S2F, h_SF = _gemm_gated(x_ND, w_gu_ED2F, activation="swiglu", cu_seqlens_m=cu_E1, A_idx=token_S,
                              dynamic_scheduler=False, tuned=_TUNED)
    y_SD = _gemm(h_SF, w_down_EFD, cu_seqlens_m=cu_E1, dynamic_scheduler=False, tuned=_TUNED)
    return weighted_sum_slots(y_SD, position_S, weight_NK.shape[1], weight_NK.reshape(-1)), z_S2F


@_forward.register_fake
def _(x_ND, w_gu_ED2F, w_down_EFD, weight_NK, token_S, position_S, cu_E1):
    S = token_S.shape[0]
    return (x_ND.new_empty(weight_NK.shape[0], w_down_EFD.shape[-1]),
            x_ND.new_empty(S, w_gu_ED2F.shape[-1]))


@torch.library.custom_op("finemoe::quack_experts_backward", mutates_args=())
def _backward(grad_ND: Tensor, x_ND: Tensor, w_gu_ED2F: Tensor, w_down_EFD: Tensor, z_S2F: Tensor,
              weight_S: Tensor, token_S: Tensor, position_S: Tensor, cu_E1: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    E, F, D = w_down_EFD.shape
    N = grad_ND.shape[0]
    grad_ND = grad_ND.contiguous()
    dz_S2F, hs_SF, ds_S = _gemm_dgated(grad_ND, w_down_EFD.transpose(1, 2), PreAct=z_S2F, activation="swiglu",
                                       colvec_scale=weight_S, colvec_reduce=True, cu_seqlens_m=cu_E1,
                                       A_idx=token_S, dynamic_scheduler=False, tuned=_TUNED)
    grad_w_down_EFD = grad_ND.new_empty(E, F, D, dtype=torch.float32)
    _gemm(grad_ND.T, hs_SF, out=grad_w_down_EFD.transpose(1, 2), cu_seqlens_k=cu_E1, A_idx=token_S,
          dynamic_scheduler=False, tuned=_TUNED)
    grad_w_gu_ED2F = grad_ND.new_empty(E, D, 2 * F, dtype=torch.float32)
    _gemm(x_ND.T, dz_S2F, out=grad_w_gu_ED2F, cu_seqlens_k=cu_E1, A_idx=token_S, dynamic_scheduler=False,
          tuned=_TUNED)
    grad_x_SD = _gemm(dz_S2F, w_gu_ED2F.transpose(1, 2), cu_seqlens_m=cu_E1, dynamic_scheduler=False,
                      tuned=_TUNED)
    K = position_S.shape[0] // N
    grad_x_ND = weighted_sum_slots(grad_x_SD, position_S, K)
    grad_weight_NK = ds_S.index_select(0, position_S).view(N, K)
    return grad_x_ND, grad_w_gu_ED2F, grad_w_down_EFD, grad_weight_NK


@_backward.register_fake
def _(grad_ND, x_ND, w_gu_ED2F, w_down_EFD, z_S2F, weight_S, token_S, position_S, cu_E1):
    E, F, D = w_down_EFD.shape
    N = grad_ND.shape[0]
    K = position_S.shape[0] // N
    return (grad_ND.new_empty(N, D), grad_ND.new_empty(E, D, 2 * F, dtype=torch.float32),
            grad_ND.new_empty(E, F, D, dtype=torch.float32), grad_ND.new_empty(N, K, dtype=torch.float32))


class _QuackTokenChoice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_gate_up_ED2F, w_down_EFD, weight_NK, token_S, position_S, order_S, cu_E1):
        dtype = x_ND.dtype
        w_gu, w_down = w_gate_up_ED2F.to(dtype), w_down_EFD.to(dtype)
        out_ND, z_S2F = _forward(x_ND, w_gu, w_down, weight_NK.float(), token_S, position_S, cu_E1)
        ctx.save_for_backward(x_ND, w_gu, w_down, z_S2F, weight_NK, token_S, position_S, order_S, cu_E1)
        ctx.weight_dtypes = (w_gate_up_ED2F.dtype, w_down_EFD.dtype, weight_NK.dtype)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, w_gu, w_down, z_S2F, weight_NK, token_S, position_S, order_S, cu_E1 = ctx.saved_tensors
        weight_S = weight_NK.reshape(-1).float().index_select(0, order_S)   # each sorted row's weight
        grad_x, grad_gate_up, grad_down, grad_weight = _backward(grad_ND.to(x_ND.dtype), x_ND, w_gu, w_down, z_S2F,
                                                                 weight_S, token_S, position_S, cu_E1)
        gu_dt, d_dt, s_dt = ctx.weight_dtypes
        return grad_x, grad_gate_up.to(gu_dt), grad_down.to(d_dt), grad_weight.to(s_dt), None, None, None, None


def quack_token_choice(x_ND: Tensor, w_gate_up_ED2F: Tensor, w_down_EFD: Tensor, weight_NK: Tensor, token_S: Tensor,
                       position_S: Tensor, order_S: Tensor, counts_E: Tensor) -> Tensor:
    """``out_n = Σ_k weight[n, k] · SwiGLU_{expert(n, k)}(x_n)`` with the slots sorted by
    expert: sorted row p is slot ``order[p]`` (token ``token[p] = order[p] // K``), slot j
    sits at row ``position[j]``, ``counts_E`` rows per expert. ``x_ND`` in the compute
    dtype (bf16); ``w_gate_up_ED2F`` with the gate's column j at 2j and the up
    projection's at 2j + 1 (``SwiGLUExperts.w_gate_up``, the pairing of QuACK's gated
    epilogue, so the weight gradient comes back in that layout as the GEMM writes it);
    weights of any float dtype (their gradients come back in it)."""
    cu_E1 = torch.nn.functional.pad(torch.cumsum(counts_E, 0, dtype=torch.int32), (1, 0))
    return _QuackTokenChoice.apply(x_ND, w_gate_up_ED2F, w_down_EFD, weight_NK, token_S.to(torch.int32), position_S,
                                   order_S, cu_E1)
