"""Summing each token's routed slots back into its row, in one pass.

Token-choice dispatch gives token n the K slots ``n·K + k``; sorted by expert, slot j
sits at row ``position[j]`` of the experts' output ``y_SD``. The layer's output is

    out[n] = Σ_k y[position[n·K + k]]

and the backward of gathering the tokens into the sorted rows is the same sum. Written
in PyTorch (the reference below) it is a gather of all S rows into slot order followed
by a reduction over K: the ``(S, D)`` buffer is written and read once more, and
Inductor's reduction over the strided K axis ran at a third of the bandwidth (profile
of E = 64, k = 8: 0.32 ms per call). The Triton kernel reads each row once and writes
each output row once, summing the K rows in float32 in the fixed order k = 0 … K−1:
deterministic, no atomic adds.

Kernel → launcher → ``torch.library.custom_op`` with a fake implementation → autograd
(the backward of the sum is the gather ``grad[order // K]``). Tested on the CPU under
``TRITON_INTERPRET=1``.

Shapes: N tokens, K slots per token, S = N·K rows, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.swiglu import triton_kernels_available

from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["gather_rows", "sum_listed_rows", "sum_slots", "sum_slots_reference", "weighted_sum_slots"]

_BLOCK_D = 1024


def sum_slots_reference(y_SD: Tensor, position_S: Tensor, K: int) -> Tensor:
    """``out[n] = Σ_k y[position[n·K + k]]``: gather into slot order, sum over K."""
    return y_SD.index_select(0, position_S).view(-1, K, y_SD.shape[-1]).sum(1)


if triton is not None:

    @triton.jit
    def _sum_slots_kernel(y_ptr, position_ptr, weight_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr,
                          SKIP_NEGATIVE: tl.constexpr, WEIGHTED: tl.constexpr):
        # SKIP_NEGATIVE: a position of -1 names no row (a slot that was not used);
        # WEIGHTED: each slot's row times its float32 weight
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(position_ptr + n * K + k).to(tl.int64)
            if SKIP_NEGATIVE:  # the bound as a scalar: a vector mask (and Triton's interpreter takes it)
                y = tl.load(y_ptr + tl.maximum(row, 0) * D + cols, mask=cols < tl.where(row >= 0, D, 0),
                            other=0.0).to(tl.float32)
            else:
                y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                y = y * tl.load(weight_ptr + n * K + k).to(tl.float32)
            acc += y
        tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_sum(y_SD: Tensor, position: Tensor, N: int, K: int, skip_negative: bool,
                weight: Tensor | None = None) -> Tensor:
    """``out[n] = Σ_k (weight[n·K + k] ·) y[position[n·K + k]]``, ``(N, D)``: one program per
    (token, tile of columns)."""
    y_SD = y_SD.contiguous()
    D = y_SD.shape[1]
    out_ND = y_SD.new_empty(N, D)
    if out_ND.numel():
        block = min(_BLOCK_D, triton.next_power_of_2(D))
        weighted = weight is not None
        launch(_sum_slots_kernel)[(N, triton.cdiv(D, block))](
            y_SD, position.contiguous(), weight.contiguous() if weighted else position, out_ND, D, K=K,
            BLOCK_D=block, SKIP_NEGATIVE=skip_negative, WEIGHTED=weighted)
    return out_ND


def weighted_sum_slots(y_SD: Tensor, position_S: Tensor, K: int, weight_S: Tensor | None = None) -> Tensor:
    """``out[n] = Σ_k weight[n·K + k] · y[position[n·K + k]]`` (unweighted without
    ``weight_S``), ``(N, D)``, summed in float32 in the order k = 0 … K−1. No autograd: for
    the bodies of operators that have their own backward (``finemoe.kernels.quack_experts``)."""
    N = position_S.shape[0] // K
    if triton_kernels_available(y_SD):
        return _launch_sum(y_SD, position_S, N, K, skip_negative=False, weight=weight_S)
    rows_NKD = y_SD.index_select(0, position_S).view(N, K, y_SD.shape[1]).float()
    if weight_S is not None:
        rows_NKD = rows_NKD * weight_S.view(N, K, 1).float()
    return rows_NKD.sum(1).to(y_SD.dtype)


@kernel_op("finemoe::sum_slots", mutates_args=())
def _sum_slots(y_SD: Tensor, position_S: Tensor, order_S: Tensor, K: int) -> Tensor:
    return _launch_sum(y_SD, position_S, y_SD.shape[0] // K, K, skip_negative=False)


@fake(_sum_slots)
def _(y_SD: Tensor, position_S: Tensor, order_S: Tensor, K: int) -> Tensor:
    return y_SD.new_empty(y_SD.shape[0] // K, y_SD.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    _, _, order_S, K = inputs
    ctx.save_for_backward(order_S)
    ctx.K = K


def _backward(ctx, grad_ND: Tensor):
    (order_S,) = ctx.saved_tensors
    # (the row kernel here measured no faster than Inductor's gather: benchmarks/NOTES.md)
    return grad_ND.index_select(0, torch.div(order_S, ctx.K, rounding_mode="floor")), None, None, None


_sum_slots.register_autograd(_backward, setup_context=_setup_context)


def sum_slots(y_SD: Tensor, position_S: Tensor, order_S: Tensor, K: int) -> Tensor:
    """``out[n] = Σ_k y[position[n·K + k]]``, ``(N, D)``; ``order`` is the inverse
    permutation of ``position`` (row p holds slot ``order[p]``), used by the backward.
    The Triton kernel on the GPU, the reference formula elsewhere."""
    if triton_kernels_available(y_SD):
        return _sum_slots(y_SD, position_S, order_S, K)
    return sum_slots_reference(y_SD, position_S, K)


@kernel_op("finemoe::sum_listed_rows", mutates_args=())
def _sum_listed_rows(y_SD: Tensor, position_NK: Tensor) -> Tensor:
    return _launch_sum(y_SD, position_NK, *position_NK.shape, skip_negative=True)


@fake(_sum_listed_rows)
def _(y_SD: Tensor, position_NK: Tensor) -> Tensor:
    return y_SD.new_empty(position_NK.shape[0], y_SD.shape[1])


def gather_rows(x_ND: Tensor, token_S: Tensor) -> Tensor:
    """``x[token]``, ``(S, D)``: the routed layers' slot gather of their input. Under ``torch.compile``
    on a GPU by the row kernel (``sum_listed_rows`` with one row listed per output row):
    Inductor then writes ``x`` once and the kernel gathers from it, where its own
    ``index_select`` recomputed ``x``'s producers (a norm, a cast) for every gathered
    row (benchmarks/NOTES.md); ``index_select`` otherwise."""
    if torch.compiler.is_compiling() and triton_kernels_available(x_ND):
        return _sum_listed_rows(x_ND, token_S.unsqueeze(1))
    return x_ND.index_select(0, token_S)


def sum_listed_rows(y_SD: Tensor, position_NK: Tensor) -> Tensor:
    """``out[n] = Σ_k y[position[n, k]]`` over the entries that are not -1, ``(N, D)``
    (a token's variable number of rows, e.g. the DSMoE blocks it switched on); summed
    in float32 in the order k = 0 … K−1. Forward only (inference)."""
    if triton_kernels_available(y_SD):
        return _sum_listed_rows(y_SD, position_NK)
    listed_NK1 = (position_NK >= 0).unsqueeze(-1)
    rows_NKD = y_SD.index_select(0, position_NK.clamp_min(0).reshape(-1)).view(*position_NK.shape, -1)
    accumulate = torch.promote_types(y_SD.dtype, torch.float32)
    return torch.where(listed_NK1, rows_NKD.to(accumulate), 0.0).sum(1).to(y_SD.dtype)
