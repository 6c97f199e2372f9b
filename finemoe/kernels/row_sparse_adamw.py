"""AdamW on the rows of a table that have a gradient, in one pass: the update of
``finemoe.optim.RowSparseAdamW``.

A PEER or PKM table (up to 1024² rows) is read through an index: a step changes only the
rows some token retrieved. Dense AdamW still reads the parameter, gradient and both
moments of every row and writes three of them back: 7 passes over the table (28 bytes
per float32 entry) each step. Here one program per row reads the row's gradient; a row
whose gradient is exactly zero everywhere (never retrieved, see ``finemoe.optim``) is
left as it is, and only the others read and write their parameter and moments:
1 + 6·(share of rows touched) passes. When the gradients are clipped first, the pass that
computes their norm (``row_squares``: each row's sum of squares, and whether it has a
non-zero entry) also writes the rows' touched flags, and the update reads those instead
of the gradient: the gradient is then read once in all, plus its touched rows.

Per touched row, with t the optimizer's step count (``torch.optim.AdamW``'s formulas):

    p ← p·(1 − lr·λ)
    m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
    p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

computed in float32 and stored in the tables' dtype. Kernel → launcher →
``torch.library.custom_op`` (in place); ``row_sparse_adamw_reference`` is the same update
in PyTorch (masked with ``torch.where``), used on the CPU and by the tests. Tested on the
CPU under ``TRITON_INTERPRET=1``.
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

__all__ = ["row_sparse_adamw_", "row_sparse_adamw_reference", "row_squares", "row_squares_reference", "touched_rows"]

_BLOCK_D = 512  # columns per step of a row (the row is walked twice: the test, then the update)


def touched_rows(grad: Tensor) -> Tensor:
    """``(rows,)`` bool: the rows whose gradient has a non-zero entry."""
    return grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)


def row_squares_reference(grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows,)`` sums of squares of each row of ``grad`` (in float32, float64 for
    float64) and ``(rows,)`` bool: the rows with a non-zero entry (``touched_rows``; not
    read off the squares, which underflow for entries below 1e-23)."""
    g = grad.reshape(grad.shape[0], -1).to(torch.promote_types(grad.dtype, torch.float32))
    return g.square().sum(dim=1), touched_rows(grad)


def row_sparse_adamw_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float,
                               beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                               grad_scale: Tensor | None = None, touched: Tensor | None = None) -> None:
    """The update in PyTorch, in place (in float32, or float64 for float64 tables): rows
    with a zero gradient keep their parameter and moments (masked with ``torch.where``;
    no host sync). ``grad_scale``: a one-element tensor the gradient is multiplied by
    first (a clipping factor); ``touched``: the rows to update (``row_squares``' flags),
    instead of those with a non-zero gradient."""
    compute = torch.promote_types(param.dtype, torch.float32)
    g = grad.to(compute) if grad_scale is None else grad.to(compute) * grad_scale.to(compute)
    touched = touched_rows(g) if touched is None else touched.bool()
    touched = touched.view(-1, *([1] * (grad.ndim - 1)))
    p = param.to(compute) * (1 - lr * weight_decay)
    m = exp_avg.to(compute) * beta1 + g * (1 - beta1)
    v = exp_avg_sq.to(compute) * beta2 + g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    p = p - lr / (1 - beta1**step) * m / denom
    for out, new in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        out.copy_(torch.where(touched, new.to(out.dtype), out))


if triton is not None:

    @triton.jit
    def _row_squares_kernel(g_ptr, squares_ptr, touched_ptr, D, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
        """One program per row: its sum of squares (float32) and whether it has a non-zero entry."""
        row = tl.program_id(0).to(tl.int64)
        squares = 0.0
        largest = 0.0
        for dc in tl.static_range(NUM_D):
            cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
            g = tl.load(g_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
            squares += tl.sum(g * g, axis=0)
            largest = tl.maximum(largest, tl.max(tl.abs(g), axis=0))
        tl.store(squares_ptr + row, squares)
        tl.store(touched_ptr + row, largest > 0.0)

    @triton.jit
    def _row_sparse_adamw_kernel(p_ptr, g_ptr, scale_ptr, touched_ptr, m_ptr, v_ptr, D, lr, beta1, beta2, eps, decay,
                                 step_size, rsqrt_bc2, HAS_SCALE: tl.constexpr, HAS_TOUCHED: tl.constexpr,
                                 BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * D
        scale = tl.load(scale_ptr) if HAS_SCALE else 1.0
        if HAS_TOUCHED:  # the flags of row_squares: the gradient of an untouched row is not read at all
            largest = tl.load(touched_ptr + row).to(tl.float32)
        else:
            largest = 0.0
            for dc in tl.static_range(NUM_D):
                cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
                g = tl.load(g_ptr + base + cols, mask=cols < D, other=0.0).to(tl.float32) * scale
                largest = tl.maximum(largest, tl.max(tl.abs(g), axis=0))
        if largest > 0.0:  # a row with no gradient reads nothing more
            for dc in tl.static_range(NUM_D):
                cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
                mask = cols < D
                g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * scale
                p = tl.load(p_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * decay
                m = tl.load(m_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * beta1 + g * (1.0 - beta1)
                v = tl.load(v_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * beta2 + g * g * (1.0 - beta2)
                p = p - step_size * m / (tl.sqrt(v) * rsqrt_bc2 + eps)
                tl.store(p_ptr + base + cols, p.to(p_ptr.dtype.element_ty), mask=mask)
                tl.store(m_ptr + base + cols, m.to(m_ptr.dtype.element_ty), mask=mask)
                tl.store(v_ptr + base + cols, v.to(v_ptr.dtype.element_ty), mask=mask)


def _column_blocks(D: int) -> dict:
    block = min(_BLOCK_D, triton.next_power_of_2(D))
    return {"BLOCK_D": block, "NUM_D": triton.cdiv(D, block)}


@kernel_op("finemoe::row_squares", mutates_args=())
def _row_squares(grad: Tensor) -> tuple[Tensor, Tensor]:
    rows = grad.shape[0]
    D = grad.numel() // rows if rows else 0
    squares = torch.empty(rows, dtype=torch.float32, device=grad.device)
    touched = torch.empty(rows, dtype=torch.bool, device=grad.device)
    if rows and D:
        launch(_row_squares_kernel)[(rows,)](grad.contiguous(), squares, touched, D, **_column_blocks(D))
    elif rows:
        squares.zero_()
        touched.zero_()
    return squares, touched


@fake(_row_squares)
def _(grad):
    rows = grad.shape[0]
    return grad.new_empty(rows, dtype=torch.float32), grad.new_empty(rows, dtype=torch.bool)


@kernel_op("finemoe::row_sparse_adamw_", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def _row_sparse_adamw(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int,
                      grad_scale: Tensor | None = None, touched: Tensor | None = None) -> None:
    rows = param.shape[0]
    D = param.numel() // rows if rows else 0
    if not rows or not D:
        return
    scale = grad_scale.float() if grad_scale is not None else grad  # unread without HAS_SCALE
    flags = touched if touched is not None else grad  # unread without HAS_TOUCHED
    launch(_row_sparse_adamw_kernel)[(rows,)](
        param, grad.contiguous(), scale, flags, exp_avg, exp_avg_sq, D, lr, beta1, beta2, eps,
        1.0 - lr * weight_decay, lr / (1.0 - beta1**step), (1.0 - beta2**step) ** -0.5,
        HAS_SCALE=grad_scale is not None, HAS_TOUCHED=touched is not None, **_column_blocks(D))


def row_sparse_adamw_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, step: int,
                      grad_scale: Tensor | None = None, touched: Tensor | None = None) -> None:
    """AdamW step ``step`` (counted from 1) on the rows of ``param`` whose ``grad`` (times
    ``grad_scale``, a one-element tensor, if given) is not all zero — or the rows flagged
    in ``touched`` (``row_squares`` of this gradient), without reading the others' — in
    place; other rows keep their parameter and moments. The Triton kernel on the GPU
    (contiguous tables), the reference formula elsewhere."""
    args = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                weight_decay=float(weight_decay), step=int(step), grad_scale=grad_scale, touched=touched)
    if triton_kernels_available(param) and all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq)):
        _row_sparse_adamw(param, grad, exp_avg, exp_avg_sq, **args)
    else:
        row_sparse_adamw_reference(param, grad, exp_avg, exp_avg_sq, **args)


def row_squares(grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows,)`` sums of squares of the rows of ``grad`` and ``(rows,)`` bool flags of
    the rows with a non-zero entry, in one pass (the Triton kernel on the GPU for float32
    and bf16 tables, ``row_squares_reference`` elsewhere)."""
    if triton_kernels_available(grad) and grad.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _row_squares(grad)
    return row_squares_reference(grad)
