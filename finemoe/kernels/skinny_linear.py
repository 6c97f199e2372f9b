"""Float32 products with few output columns: the routers' ``logits = u Wᵀ``.

Every routed design computes its router in float32 (METHODS.md: "Router math runs in
float32"), a product of the ``(N, D)`` normed input with a weight of E ≤ a few dozen rows.
cuBLAS has no good kernel for that shape without TF32: at moe E = 8 (16,384 tokens,
d = 1024) its three products took 49 µs forward and 47 + 28 µs backward, where their bytes
(the float32 input read once forward; the input gradient written and the input read once
more backward) take ~21 and ~42 µs at the HBM bandwidth (benchmarks/NOTES.md). These
kernels stream the input once per pass, as IEEE float32 sums of products:

    forward:   y = u Wᵀ                      (one program per block of rows, the E outputs
                                              accumulated over column tiles)
    backward:  du = dy W,   dW = dyᵀ u       (one pass over the rows: each column tile of
                                              ``du`` written and of ``u`` read once; ``dW``
                                              as one partial sum per program, added in a
                                              fixed order: deterministic, no atomics)

Kernel → launcher → ``kernel_op`` (``finemoe.kernels.op``) with its autograd formula;
``finemoe.layers.common.float32_linear`` takes it on a GPU for E ≤ ``MAX_OUTPUTS`` and keeps
``F.linear`` (the reference) elsewhere. Tested under ``TRITON_INTERPRET=1`` against
float64 (tests/test_kernels.py) and on the GPU against cuBLAS in float32 (tests/test_gpu.py).

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

MAX_OUTPUTS = 16
"""Past this many outputs the sums of products stop being free beside the bytes (IEEE
float32 products run on the FMA units, not the tensor cores), and cuBLAS is kept."""

_BLOCK_N, _BLOCK_D = 64, 128

if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, y_ptr, N, E, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_E: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        outs = tl.arange(0, BLOCK_E)
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < D),
                        other=0.0)
            w = tl.load(w_ptr + outs[None, :] * D + cols[:, None], mask=(cols[:, None] < D) & (outs[None, :] < E),
                        other=0.0)                                         # (BLOCK_D, BLOCK_E): Wᵀ's tile
            acc += tl.dot(x, w, input_precision="ieee")
        tl.store(y_ptr + rows64[:, None] * E + outs[None, :], acc, mask=(rows[:, None] < N) & (outs[None, :] < E))

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, N, E, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
        program = tl.program_id(0)
        rows = program * BLOCK_N + tl.arange(0, BLOCK_N)
        outs = tl.arange(0, BLOCK_E)
        rows64 = rows.to(tl.int64)
        row_ok = rows < N
        dy = tl.load(dy_ptr + rows64[:, None] * E + outs[None, :], mask=row_ok[:, None] & (outs[None, :] < E),
                     other=0.0)                                            # (BLOCK_N, BLOCK_E), zero past the ends
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            w = tl.load(w_ptr + outs[:, None] * D + cols[None, :], mask=(outs[:, None] < E) & col_ok[None, :],
                        other=0.0)                                         # (BLOCK_E, BLOCK_D)
            tl.store(dx_ptr + rows64[:, None] * D + cols[None, :], tl.dot(dy, w, input_precision="ieee"),
                     mask=row_ok[:, None] & col_ok[None, :])
            x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            part = tl.dot(tl.trans(dy), x, input_precision="ieee")         # (BLOCK_E, BLOCK_D): this program's rows
            tl.store(dw_part_ptr + (program * E + outs[:, None]).to(tl.int64) * D + cols[None, :], part,
                     mask=(outs[:, None] < E) & col_ok[None, :])


def skinny_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x Wᵀ`` runs in these kernels: float32 on a GPU where finemoe's Triton
    kernels run, at most ``MAX_OUTPUTS`` outputs."""
    return (triton_kernels_available(x) and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and 0 < weight.shape[0] <= MAX_OUTPUTS)


def _block_e(E: int) -> int:
    return max(16, triton.next_power_of_2(E))  # tl.dot wants every side >= 16: zero-padded outputs


@kernel_op("finemoe::skinny_linear", mutates_args=())
def _skinny_linear(x_ND: Tensor, w_ED: Tensor) -> Tensor:
    x_ND, w_ED = x_ND.contiguous(), w_ED.contiguous()
    (N, D), E = x_ND.shape, w_ED.shape[0]
    y_NE = x_ND.new_empty(N, E)
    if N == 0:
        return y_NE
    launch(_forward_kernel)[(triton.cdiv(N, _BLOCK_N),)](x_ND, w_ED, y_NE, N, E, D=D, BLOCK_N=_BLOCK_N,
                                                         BLOCK_D=_BLOCK_D, BLOCK_E=_block_e(E))
    return y_NE


@fake(_skinny_linear)
def _(x_ND: Tensor, w_ED: Tensor) -> Tensor:
    return x_ND.new_empty(x_ND.shape[0], w_ED.shape[0])


@kernel_op("finemoe::skinny_linear_backward", mutates_args=())
def _skinny_linear_backward(dy_NE: Tensor, x_ND: Tensor, w_ED: Tensor) -> tuple[Tensor, Tensor]:
    dy_NE, x_ND, w_ED = dy_NE.contiguous(), x_ND.contiguous(), w_ED.contiguous()
    (N, D), E = x_ND.shape, w_ED.shape[0]
    programs = triton.cdiv(N, _BLOCK_N)
    dx_ND = torch.empty_like(x_ND)
    dw_parts = x_ND.new_zeros(max(programs, 1), E, D)
    if N:
        launch(_backward_kernel)[(programs,)](dy_NE, x_ND, w_ED, dx_ND, dw_parts, N, E, D=D, BLOCK_N=_BLOCK_N,
                                              BLOCK_D=_BLOCK_D, BLOCK_E=_block_e(E))
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
