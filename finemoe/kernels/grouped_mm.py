"""Grouped matrix products for expert banks: ``out[rows of group e] = x[rows of group e] @ w[e]``.

One op, ``finemoe::grouped_mm``, whose rows are grouped by expert (``offs``: the int32
end of each group, on the device). It runs PyTorch's grouped GEMM (``torch._grouped_mm``,
CUTLASS on CUDA sm80+ in bf16; a CPU kernel in float32/bf16 from torch 2.9) where this
torch, device, dtype and alignment allow, and otherwise a loop of one GEMM per group
(any dtype: float64 for the reference tests, float32 on a GPU, torch < 2.8). Being a
custom op with a fake implementation, it is one opaque node to ``torch.compile``
whichever way it runs, so a model compiles with ``fullgraph=True`` on any device.

Backward: ``dx = dout @ w[e]ᵀ`` is the same op on transposed weights; ``dw[e] =
x_eᵀ dout_e`` is the grouped product that contracts over each group's rows
(``torch._grouped_mm(xᵀ, dout, offs)``), zero for an empty group.

Shapes: S rows, D in width, F out width, E groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_mm", "grouped_mm_op", "native_grouped_mm_supported"]

_native = getattr(torch, "_grouped_mm", None)


def native_grouped_mm_supported(*tensors: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: same dtype, a device and dtype
    its kernels cover, every stride (but the unit one) a multiple of 16 bytes."""
    if _native is None:
        return False
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype for t in tensors):
        return False
    if device.type == "cuda":
        ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    elif device.type == "cpu":
        ok = dtype in (torch.float32, torch.bfloat16) and torch.__version__ >= "2.9"
    else:
        ok = False
    size = tensors[0].element_size()
    return ok and all((s * size) % 16 == 0 for t in tensors for s in t.stride() if s != 1)


def _group_bounds(offs_E: Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()  # host sync: only on the fallback path
    return list(zip([0] + ends[:-1], ends))


def grouped_mm(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    """``(S, D) × (E, D, F) → (S, F)``: rows ``[offs[e-1], offs[e])`` times ``w[e]``.

    In bf16, where torch's kernel applies, it is called directly: it has its own
    autograd and compile support, and skips the custom op's dispatch cost in eager mode
    (its fake implementation takes bf16 only). Otherwise the custom op below."""
    if x_SD.dtype == torch.bfloat16 and native_grouped_mm_supported(x_SD, w_EDF):
        return _native(x_SD, w_EDF, offs=offs_E)
    return grouped_mm_op(x_SD, w_EDF, offs_E)


@torch.library.custom_op("finemoe::grouped_mm", mutates_args=())
def grouped_mm_op(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    """``(S, D) × (E, D, F) → (S, F)``: rows ``[offs[e-1], offs[e])`` times ``w[e]``."""
    if native_grouped_mm_supported(x_SD, w_EDF):
        return _native(x_SD, w_EDF, offs=offs_E)
    out_SF = x_SD.new_zeros(x_SD.shape[0], w_EDF.shape[-1])
    for e, (start, end) in enumerate(_group_bounds(offs_E)):
        if end > start:
            out_SF[start:end] = x_SD[start:end] @ w_EDF[e]
    return out_SF


@grouped_mm_op.register_fake
def _(x_SD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
    return x_SD.new_empty(x_SD.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("finemoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_SD: Tensor, grad_SF: Tensor, offs_E: Tensor) -> Tensor:
    """``dw[e] = x_eᵀ dout_e``, ``(E, D, F)``; zero for an empty group."""
    if native_grouped_mm_supported(x_SD, grad_SF):
        return _native(x_SD.t(), grad_SF, offs=offs_E)
    bounds = _group_bounds(offs_E)
    out_EDF = x_SD.new_zeros(len(bounds), x_SD.shape[1], grad_SF.shape[1])
    for e, (start, end) in enumerate(bounds):
        if end > start:
            out_EDF[e] = x_SD[start:end].t() @ grad_SF[start:end]
    return out_EDF


@grouped_mm_weight_grad.register_fake
def _(x_SD: Tensor, grad_SF: Tensor, offs_E: Tensor) -> Tensor:
    return x_SD.new_empty(offs_E.shape[0], x_SD.shape[1], grad_SF.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_SD, w_EDF, offs_E = inputs
    ctx.save_for_backward(x_SD, w_EDF, offs_E)


def _backward(ctx, grad_SF: Tensor):
    x_SD, w_EDF, offs_E = ctx.saved_tensors
    grad_SF = grad_SF.contiguous()
    grad_x = grouped_mm_op(grad_SF, w_EDF.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x_SD, grad_SF, offs_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
