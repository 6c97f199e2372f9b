"""Float32 products with few output columns: the routers' ``logits = u Wᵀ``.

Every routed design computes its router in float32 (METHODS.md: "Router math runs in
float32"), a product of the ``(N, D)`` normed input with a weight of a few rows. cuBLAS
has no good kernel for that shape without TF32: at moe E = 8 (16,384 tokens, d = 1024)
its three products take ~50 µs forward and ~47 + 29 µs backward, where their bytes (the
float32 input read once forward; the input gradient written and the input read once
more backward) take ~22 and ~45 µs at the HBM bandwidth (benchmarks/NOTES.md). These
kernels stream the input once per pass and compute on the FMA units in float32:

    forward:   y = u Wᵀ              a program's rows times every output row of W, as
                                     (rows, E, columns) products summed over the column
                                     tiles and reduced over the columns once at the end
    backward:  du = dy W             each program owns a group of rows and a column tile:
               dW = dyᵀ u            du's tile written, u's tile read once, dW's tile for
                                     the group as (rows, E, columns) products reduced over
                                     the rows once at the end; the groups' partial dW
                                     added in a fixed order (deterministic, no atomics)

The products are laid out as 3-d tiles so that neither loop reduces across threads: an
earlier version on IEEE float32 ``tl.dot`` (not a tensor-core product; Triton lowers it
to slow FMA loops) took 5.6× cuBLAS's time (benchmarks/NOTES.md).

Kernel → launcher → ``kernel_op`` (``finemoe.kernels.op``) with its autograd formula;
``finemoe.layers.common.float32_linear`` takes it on a GPU for E ≤ ``MAX_OUTPUTS`` and keeps
``F.linear`` (the reference) elsewhere. Tested under ``TRITON_INTERPRET=1`` against
float64 (tests/test_kernels.py) and on the GPU against float64 (tests/test_gpu.py).

Shapes: N rows, D input width, E outputs (the weight is ``(E, D)``, as ``nn.Linear``'s).
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch
from finemoe.kernels.swiglu import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["MAX_OUTPUTS", "skinny_linear", "skinny_linear_applies"]

MAX_OUTPUTS = 8
"""Past this many outputs cuBLAS is kept: the FMA products stop being free beside the
bytes (H100, 16,384 × 1024 input: forward 30 µs against cuBLAS's 44 at E = 8, 50–56
against 44 at E = 10 and 16; benchmarks/NOTES.md)."""

FORWARD_TILE = {"BLOCK_N": 4, "BLOCK_D": 64, "num_warps": 1}
BACKWARD_TILE = {"BLOCK_N": 16, "BLOCK_D": 32, "ROWS": 256, "num_warps": 2}
"""Rows and columns per tile (and per program's group of rows, backward); module-level so
that benchmarks/experiments/router_kernel_ab.py can sweep them."""

if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, y_ptr, N, D, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]     # (BLOCK_N, 1, 1)
        outs = tl.arange(0, BLOCK_E)[None, :, None]                                   # (1, BLOCK_E, 1)
        row_ok, out_ok = rows < N, outs < E
        x_rows = x_ptr + rows.to(tl.int64) * D
        acc = tl.zeros((BLOCK_N, BLOCK_E, BLOCK_D), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)[None, None, :]                       # (1, 1, BLOCK_D)
            x = tl.load(x_rows + cols, mask=row_ok & (cols < D), other=0.0)           # (BLOCK_N, 1, BLOCK_D)
            w = tl.load(w_ptr + outs * D + cols, mask=out_ok & (cols < D), other=0.0)  # (1, BLOCK_E, BLOCK_D)
            acc += x * w
        y = tl.sum(acc, axis=2, keep_dims=True)                                       # (BLOCK_N, BLOCK_E, 1)
        tl.store(y_ptr + rows.to(tl.int64) * E + outs, y, mask=row_ok & out_ok)

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, N, D, ROWS, E: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        group = tl.program_id(0)
        outs = tl.arange(0, BLOCK_E)[None, :, None]                                   # (1, BLOCK_E, 1)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[None, None, :]      # (1, 1, BLOCK_D)
        out_ok, col_ok = outs < E, cols < D
        w = tl.load(w_ptr + outs * D + cols, mask=out_ok & col_ok, other=0.0)         # (1, BLOCK_E, BLOCK_D)
        acc = tl.zeros((BLOCK_N, BLOCK_E, BLOCK_D), dtype=tl.float32)
        first = group * ROWS
        last = tl.minimum(first + ROWS, N)
        for start in range(first, last, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)[:, None, None]                       # (BLOCK_N, 1, 1)
            row_ok = rows < last
            rows64 = rows.to(tl.int64)
            dy = tl.load(dy_ptr + rows64 * E + outs, mask=row_ok & out_ok, other=0.0)  # (BLOCK_N, BLOCK_E, 1)
            x = tl.load(x_ptr + rows64 * D + cols, mask=row_ok & col_ok, other=0.0)   # (BLOCK_N, 1, BLOCK_D)
            tl.store(dx_ptr + rows64 * D + cols, tl.sum(dy * w, axis=1, keep_dims=True), mask=row_ok & col_ok)
            acc += dy * x
        part = tl.sum(acc, axis=0, keep_dims=True)                                    # (1, BLOCK_E, BLOCK_D)
        tl.store(dw_part_ptr + (group * E + outs).to(tl.int64) * D + cols, part, mask=out_ok & col_ok)


def skinny_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x Wᵀ`` runs in these kernels: float32 on a GPU where finemoe's Triton
    kernels run, at most ``MAX_OUTPUTS`` outputs."""
    return (triton_kernels_available(x) and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and 0 < weight.shape[0] <= MAX_OUTPUTS)


@kernel_op("finemoe::skinny_linear", mutates_args=())
def _skinny_linear(x_ND: Tensor, w_ED: Tensor) -> Tensor:
    x_ND, w_ED = x_ND.contiguous(), w_ED.contiguous()
    (N, D), E = x_ND.shape, w_ED.shape[0]
    y_NE = x_ND.new_empty(N, E)
    if N == 0:
        return y_NE
    tile = FORWARD_TILE
    launch(_forward_kernel)[(triton.cdiv(N, tile["BLOCK_N"]),)](
        x_ND, w_ED, y_NE, N, D, E=E, BLOCK_N=tile["BLOCK_N"], BLOCK_E=triton.next_power_of_2(E),
        BLOCK_D=tile["BLOCK_D"], num_warps=tile["num_warps"])
    return y_NE


@fake(_skinny_linear)
def _(x_ND: Tensor, w_ED: Tensor) -> Tensor:
    return x_ND.new_empty(x_ND.shape[0], w_ED.shape[0])


@kernel_op("finemoe::skinny_linear_backward", mutates_args=())
def _skinny_linear_backward(dy_NE: Tensor, x_ND: Tensor, w_ED: Tensor) -> tuple[Tensor, Tensor]:
    dy_NE, x_ND, w_ED = dy_NE.contiguous(), x_ND.contiguous(), w_ED.contiguous()
    (N, D), E = x_ND.shape, w_ED.shape[0]
    tile = BACKWARD_TILE
    groups = triton.cdiv(N, tile["ROWS"])
    dx_ND = torch.empty_like(x_ND)
    if N == 0:
        return dx_ND, w_ED.new_zeros(w_ED.shape)
    dw_parts = x_ND.new_empty(groups, E, D)  # every entry written
    launch(_backward_kernel)[(groups, triton.cdiv(D, tile["BLOCK_D"]))](
        dy_NE, x_ND, w_ED, dx_ND, dw_parts, N, D, tile["ROWS"], E=E, BLOCK_N=tile["BLOCK_N"],
        BLOCK_E=triton.next_power_of_2(E), BLOCK_D=tile["BLOCK_D"], num_warps=tile["num_warps"])
    return dx_ND, dw_parts.sum(0)


@fake(_skinny_linear_backward)
def _(dy_NE: Tensor, x_ND: Tensor, w_ED: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x_ND), w_ED.new_empty(w_ED.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_NE: Tensor):
    x_ND, w_ED = ctx.saved_tensors
    return _skinny_linear_backward(dy_NE, x_ND, w_ED)


_skinny_linear.register_autograd(_backward, setup_context=_setup_context)


def skinny_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x Wᵀ`` for float32 ``x`` of shape ``(..., D)`` and ``weight`` ``(E, D)``, E small,
    in float32 sums of products, forward and backward (``skinny_linear_applies`` says where
    it runs)."""
    return _skinny_linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
