"""A router's float32 product ``x Wᵀ + b`` for few output columns, and its two gradients.

Every design's router (METHODS.md: router math in float32) multiplies the normed
float32 input ``(N, D)`` by a weight of a few rows (E experts, DSMoE's n gates, the
mixing gate): C ≤ 128 columns. cuBLAS runs these skinny float32 products well below
the bandwidth they need (one pass over the input each): 128 µs forward + backward at
16,384 × 1024, E = 8 + 2, on an H100, against a 63 µs floor (benchmarks/NOTES.md). Here:

- forward: one program per tile of rows reads them once and computes all C logits;
- input gradient ``g W``: one program per tile of rows and columns;
- weight gradient ``gᵀ x``: each program sums one slice of the rows for one tile of
  columns into its own partial, and the partials are added in a fixed order
  (deterministic, no atomic adds).

The products are float32 ``tl.dot`` s in IEEE precision (never TF32). Kernel →
launcher → ``torch.library`` operator (``finemoe.kernels.op``); the autograd is
``finemoe.layers.common.float32_linear``'s. Tested against float64 on the CPU under
``TRITON_INTERPRET=1``.

Shapes: M rows, D in width, C columns (padded to CP), P row slices.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch
from finemoe.kernels.swiglu import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["router_linear", "router_linear_grads", "router_linear_supported"]

MAX_COLUMNS = 128
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK_M, _BLOCK_K, _BLOCK_D, _SLICES = (16, 16, 16, 3) if _INTERPRETED else (64, 64, 64, 64)


def router_linear_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether the kernels run: float32 operands on a GPU (or under the interpreter), at
    most ``MAX_COLUMNS`` output columns."""
    return (triton_kernels_available(x) and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and 0 < weight.shape[0] <= MAX_COLUMNS)


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, C, D: tl.constexpr, CP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        cs = tl.arange(0, CP)
        c_ok = cs < C
        acc = tl.zeros((BLOCK_M, CP), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cs[None, :] * D + ks[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + cs, mask=c_ok, other=0.0)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * C + cs[None, :], acc, mask=row_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _grad_input_kernel(g_ptr, w_ptr, dx_ptr, M, C, D: tl.constexpr, CP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        cs = tl.arange(0, CP)
        c_ok = cs < C
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * C + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cs[:, None] * D + ds[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        dx = tl.dot(g, w, input_precision="ieee")
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], dx, mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _grad_weight_kernel(g_ptr, x_ptr, partial_ptr, M, C, rows_per_slice, D: tl.constexpr, CP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        p = tl.program_id(0)
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        cs = tl.arange(0, CP)
        c_ok = cs < C
        acc = tl.zeros((CP, BLOCK_D), dtype=tl.float32)
        start = p * rows_per_slice
        end = tl.minimum(start + rows_per_slice, M)
        r = start
        while r < end:  # a runtime bound: a while loop (the interpreter rejects range() over one)
            rows = r + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            g = tl.load(g_ptr + rows[None, :].to(tl.int64) * C + cs[:, None], mask=c_ok[:, None] & row_ok[None, :],
                        other=0.0)  # (CP, BLOCK_M): gᵀ
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = tl.dot(g, x, acc, input_precision="ieee")
            r += BLOCK_M
        tl.store(partial_ptr + (p * CP + cs[:, None]) * D + ds[None, :], acc, mask=d_ok[None, :])


def _padded(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


@kernel_op("finemoe::router_linear", mutates_args=())
def _router_linear(x_MD: Tensor, weight_CD: Tensor, bias_C: Tensor | None) -> Tensor:
    x_MD, weight_CD = x_MD.contiguous(), weight_CD.contiguous()
    (M, D), C = x_MD.shape, weight_CD.shape[0]
    y_MC = x_MD.new_empty(M, C)
    if M:
        launch(_forward_kernel)[(triton.cdiv(M, _BLOCK_M),)](
            x_MD, weight_CD, weight_CD if bias_C is None else bias_C.contiguous(), y_MC, M, C, D=D, CP=_padded(C),
            HAS_BIAS=bias_C is not None, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K)
    return y_MC


@fake(_router_linear)
def _(x_MD: Tensor, weight_CD: Tensor, bias_C: Tensor | None) -> Tensor:
    return x_MD.new_empty(x_MD.shape[0], weight_CD.shape[0])


@kernel_op("finemoe::router_linear_grad_input", mutates_args=())
def _router_linear_grad_input(grad_MC: Tensor, weight_CD: Tensor) -> Tensor:
    grad_MC, weight_CD = grad_MC.contiguous(), weight_CD.contiguous()
    (M, C), D = grad_MC.shape, weight_CD.shape[1]
    grad_x_MD = grad_MC.new_empty(M, D)
    if M:
        launch(_grad_input_kernel)[(triton.cdiv(M, _BLOCK_M), triton.cdiv(D, _BLOCK_D))](
            grad_MC, weight_CD, grad_x_MD, M, C, D=D, CP=_padded(C), BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D)
    return grad_x_MD


@fake(_router_linear_grad_input)
def _(grad_MC: Tensor, weight_CD: Tensor) -> Tensor:
    return grad_MC.new_empty(grad_MC.shape[0], weight_CD.shape[1])


@kernel_op("finemoe::router_linear_grad_weight", mutates_args=())
def _router_linear_grad_weight(grad_MC: Tensor, x_MD: Tensor) -> Tensor:
    grad_MC, x_MD = grad_MC.contiguous(), x_MD.contiguous()
    (M, C), D = grad_MC.shape, x_MD.shape[1]
    CP = _padded(C)
    rows_per_slice = triton.cdiv(triton.cdiv(max(M, 1), _SLICES), _BLOCK_M) * _BLOCK_M
    slices = max(1, triton.cdiv(M, rows_per_slice))
    partial_PCD = x_MD.new_empty(slices, CP, D)
    launch(_grad_weight_kernel)[(slices, triton.cdiv(D, _BLOCK_D))](
        grad_MC, x_MD, partial_PCD, M, C, rows_per_slice, D=D, CP=CP, BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D)
    return partial_PCD.sum(0)[:C]  # the slices' partial sums, added in a fixed order


@fake(_router_linear_grad_weight)
def _(grad_MC: Tensor, x_MD: Tensor) -> Tensor:
    return x_MD.new_empty(grad_MC.shape[1], x_MD.shape[1])


def router_linear(x_MD: Tensor, weight_CD: Tensor, bias_C: Tensor | None = None) -> Tensor:
    """``x Wᵀ + b``, ``(M, C)`` float32, by the kernel (``router_linear_supported``)."""
    return _router_linear(x_MD, weight_CD, bias_C)


def router_linear_grads(grad_MC: Tensor, x_MD: Tensor, weight_CD: Tensor, need_x: bool,
                        need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(g W, gᵀ x)``, each only if needed, by the kernels."""
    return (_router_linear_grad_input(grad_MC, weight_CD) if need_x else None,
            _router_linear_grad_weight(grad_MC, x_MD) if need_weight else None)
