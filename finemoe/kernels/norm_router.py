"""A routed layer's input side in two passes: RMSNorm, the cast for the experts and the
float32 router, forward and backward.

Forward, one pass over the layer's float32 input ``h``:

    u      = ĥ ⊙ w,  ĥ = h · rstd,  rstd = 1 / sqrt(mean(h²) + eps)      float32
    x      = u in the compute dtype                                      for the experts
    logits = u Wᵀ + b                                                   float32, C columns

Backward, from ``dx`` (the experts' gradient, compute dtype) and ``dlogits`` (float32):

    du = dx + dlogits W
    dh = rstd · (w ⊙ du) − h · rstd³ · mean(w ⊙ du ⊙ h)
    dw = Σ_n du ⊙ ĥ,   dW = Σ_n dlogitsᵀ u,   db = Σ_n dlogits

Unfused, PyTorch (and Inductor) runs the norm and its cast as one pass and the router as
three float32 cuBLAS GEMMs of C ≤ 64 columns, each of which reads or writes the float32
``(N, D)`` input again at a fraction of the bandwidth (moe E = 8: 125 µs for the router's
three GEMMs against a ~63 µs floor, on top of the norm's 133; benchmarks/NOTES.md). Here
the forward reads ``h`` once and writes ``x`` and the logits; the backward reads ``h`` and
``dx`` twice (a first pass for each row's ``rstd`` and ``mean(w ⊙ du ⊙ h)``, a second,
over column tiles, for ``dh`` and the weight gradients) and writes ``dh`` once. Router math
stays float32 (METHODS.md): the logits are float32 sums of float32 products, and the
small products of the backward run as IEEE float32 ``tl.dot``.

The weight gradients are reductions over tokens: each program of the second pass sums
its rows', and the per-program partial sums are added after in a fixed order
(deterministic, no atomics).

Kernel → launcher → operator (``finemoe.kernels.op``) → autograd. The reference is the
layer's ``RMSNorm`` followed by ``float32_linear``; the tests compare the two under
``TRITON_INTERPRET=1`` on the CPU and on the GPU.

Shapes: N tokens, D model width, C router columns.
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

__all__ = ["norm_and_router", "norm_and_router_applies"]

_MAX_COLUMNS = 64
"""Most router columns (the forward sums one product per column and row)."""
_MAX_WIDTH = 8192
"""Widest ``D`` (a forward program holds whole rows)."""
_FORWARD_ROWS, _FORWARD_WARPS = 4, 1
_STAT_ROWS, _STAT_COLS, _STAT_WARPS = 8, 128, 2
_GRAD_ROWS, _GRAD_COLS, _GRAD_GROUPS, _GRAD_WARPS = 32, 128, 64, 4
"""Second backward pass: programs of ``_GRAD_COLS`` columns, each over every
``_GRAD_GROUPS``-th block of ``_GRAD_ROWS`` rows (so partial sums are (groups, C, D))."""


def norm_and_router_applies(h: Tensor, columns: int) -> bool:
    """A float32 input where finemoe's kernels run (a GPU, ``FINEMOE_KERNELS`` not
    ``0``), at most ``_MAX_COLUMNS`` router columns and ``_MAX_WIDTH`` model width.
    (Under the CPU interpreter the kernels run when called, but layers keep their PyTorch
    path there: the tests call the kernels directly.)"""
    return (triton_kernels_available(h) and h.dtype == torch.float32 and 0 < columns <= _MAX_COLUMNS
            and 0 < h.shape[-1] <= _MAX_WIDTH)


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, W_ptr, b_ptr, x_ptr, logits_ptr, N, eps, D: tl.constexpr,
                        D_PAD: tl.constexpr, C: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, D_PAD)
        row_ok, col_ok = rows < N, cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0)
        rstd = tl.rsqrt(tl.sum(h * h, 1) / D + eps)
        u = h * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(x_ptr + offsets, u.to(x_ptr.dtype.element_ty), mask=ok)
        for c in tl.static_range(C):
            logit = tl.sum(u * tl.load(W_ptr + c * D + cols, mask=col_ok, other=0.0)[None, :], 1)
            if HAS_BIAS:
                logit += tl.load(b_ptr + c)
            tl.store(logits_ptr + rows * C + c, logit, mask=row_ok)

    @triton.jit
    def _router_input_grad(dx_ptr, dl, W_ptr, rows, cols, row_ok, col_ok, classes, D: tl.constexpr,
                           C: tl.constexpr):
        """``du = dx + dlogits W`` on a tile of rows and columns (float32)."""
        ok = row_ok[:, None] & col_ok[None, :]
        dx = tl.load(dx_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        W = tl.load(W_ptr + classes[:, None] * D + cols[None, :], mask=(classes < C)[:, None] & col_ok[None, :],
                    other=0.0)
        return dx + tl.dot(dl, W, input_precision="ieee")

    @triton.jit
    def _row_stats_kernel(h_ptr, w_ptr, W_ptr, dx_ptr, dlogits_ptr, rstd_ptr, coef_ptr, N, eps, D: tl.constexpr,
                          C: tl.constexpr, C_PAD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        # per row: rstd, and rstd³ · mean(w ⊙ du ⊙ h), the scalar the norm's backward needs
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        classes = tl.arange(0, C_PAD)
        dl = tl.load(dlogits_ptr + rows[:, None] * C + classes[None, :], mask=row_ok[:, None] & (classes < C)[None, :],
                     other=0.0)
        squares = tl.zeros((ROWS,), dtype=tl.float32)
        dots = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, D, COLS):
            cols = start + tl.arange(0, COLS)
            col_ok = cols < D
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            du = _router_input_grad(dx_ptr, dl, W_ptr, rows, cols, row_ok, col_ok, classes, D, C)
            squares += tl.sum(h * h, 1)
            dots += tl.sum(tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :] * du * h, 1)
        rstd = tl.rsqrt(squares / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        tl.store(coef_ptr + rows, rstd * rstd * rstd * dots / D, mask=row_ok)

    @triton.jit
    def _grads_kernel(h_ptr, w_ptr, W_ptr, dx_ptr, dlogits_ptr, rstd_ptr, coef_ptr, dh_ptr, dw_part_ptr, dW_part_ptr,
                      N, D: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, ROWS: tl.constexpr,
                      COLS: tl.constexpr, GROUPS: tl.constexpr):
        cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
        group = tl.program_id(1)
        col_ok = cols < D
        classes = tl.arange(0, C_PAD)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
        dw = tl.zeros((COLS,), dtype=tl.float32)
        dW = tl.zeros((C_PAD, COLS), dtype=tl.float32)
        start = group * ROWS
        while start < N:  # every GROUPS-th block of rows (a while loop: the interpreter's for needs constant bounds)
            rows = start + tl.arange(0, ROWS)
            row_ok = rows < N
            ok = row_ok[:, None] & col_ok[None, :]
            offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
            dl = tl.load(dlogits_ptr + rows[:, None] * C + classes[None, :],
                         mask=row_ok[:, None] & (classes < C)[None, :], other=0.0)
            h = tl.load(h_ptr + offsets, mask=ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
            du = _router_input_grad(dx_ptr, dl, W_ptr, rows, cols, row_ok, col_ok, classes, D, C)
            tl.store(dh_ptr + offsets, rstd[:, None] * w[None, :] * du - h * coef[:, None], mask=ok)
            h_hat = h * rstd[:, None]
            dw += tl.sum(du * h_hat, 0)
            dW += tl.dot(tl.trans(dl), h_hat * w[None, :], input_precision="ieee")
            start += GROUPS * ROWS
        tl.store(dw_part_ptr + group * D + cols, dw, mask=col_ok)
        tl.store(dW_part_ptr + group * C_PAD * D + classes[:, None] * D + cols[None, :], dW,
                 mask=(classes < C)[:, None] & col_ok[None, :])


@kernel_op("finemoe::norm_and_router", mutates_args=())
def _norm_and_router(h_ND: Tensor, norm_weight: Tensor, weight_CD: Tensor, bias_C: Tensor | None, eps: float,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    h_ND, norm_weight, weight_CD = h_ND.contiguous(), norm_weight.contiguous(), weight_CD.contiguous()
    (N, D), C = h_ND.shape, weight_CD.shape[0]
    x_ND = torch.empty(N, D, dtype=dtype, device=h_ND.device)
    logits_NC = torch.empty(N, C, dtype=torch.float32, device=h_ND.device)
    if N:
        D_PAD = triton.next_power_of_2(D)
        rows = max(1, min(_FORWARD_ROWS, _MAX_WIDTH // D_PAD))  # at most 8,192 values a program
        launch(_forward_kernel)[(triton.cdiv(N, rows),)](
            h_ND, norm_weight, weight_CD, weight_CD if bias_C is None else bias_C.contiguous(), x_ND, logits_NC, N,
            eps, D=D, D_PAD=D_PAD, C=C, HAS_BIAS=bias_C is not None, ROWS=rows, num_warps=_FORWARD_WARPS if D_PAD <= 2048 else 8)
    return x_ND, logits_NC


@fake(_norm_and_router)
def _(h_ND, norm_weight, weight_CD, bias_C, eps, dtype):
    return h_ND.new_empty(h_ND.shape, dtype=dtype), h_ND.new_empty(h_ND.shape[0], weight_CD.shape[0])


@kernel_op("finemoe::norm_and_router_backward", mutates_args=())
def _norm_and_router_backward(h_ND: Tensor, norm_weight: Tensor, weight_CD: Tensor, dx_ND: Tensor,
                              dlogits_NC: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h_ND, norm_weight, weight_CD = h_ND.contiguous(), norm_weight.contiguous(), weight_CD.contiguous()
    dx_ND, dlogits_NC = dx_ND.contiguous(), dlogits_NC.contiguous()
    (N, D), C = h_ND.shape, weight_CD.shape[0]
    C_PAD = _padded(C)
    dh_ND = torch.empty_like(h_ND)
    dw_part = torch.zeros(_GRAD_GROUPS, D, dtype=torch.float32, device=h_ND.device)
    dW_part = torch.zeros(_GRAD_GROUPS, C_PAD, D, dtype=torch.float32, device=h_ND.device)
    if N:
        rstd_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        coef_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        launch(_row_stats_kernel)[(triton.cdiv(N, _STAT_ROWS),)](
            h_ND, norm_weight, weight_CD, dx_ND, dlogits_NC, rstd_N, coef_N, N, eps, D=D, C=C, C_PAD=C_PAD,
            ROWS=_STAT_ROWS, COLS=min(_STAT_COLS, _padded(D)), num_warps=_STAT_WARPS)
        cols = min(_GRAD_COLS, _padded(D))
        launch(_grads_kernel)[(triton.cdiv(D, cols), _GRAD_GROUPS)](
            h_ND, norm_weight, weight_CD, dx_ND, dlogits_NC, rstd_N, coef_N, dh_ND, dw_part, dW_part, N, D=D, C=C,
            C_PAD=C_PAD, ROWS=_GRAD_ROWS, COLS=cols, GROUPS=_GRAD_GROUPS, num_warps=_GRAD_WARPS)
    return dh_ND, dw_part.sum(0), dW_part.sum(0)[:C].contiguous()


@fake(_norm_and_router_backward)
def _(h_ND, norm_weight, weight_CD, dx_ND, dlogits_NC, eps):
    return torch.empty_like(h_ND), torch.empty_like(norm_weight), torch.empty_like(weight_CD)


def _setup_context(ctx, inputs, output) -> None:
    h_ND, norm_weight, weight_CD, bias_C, eps, _ = inputs
    ctx.save_for_backward(h_ND, norm_weight, weight_CD)
    ctx.eps, ctx.has_bias = eps, bias_C is not None


def _backward(ctx, dx_ND: Tensor | None, dlogits_NC: Tensor | None):
    h_ND, norm_weight, weight_CD = ctx.saved_tensors
    if dx_ND is None:
        dx_ND = torch.zeros_like(h_ND)
    if dlogits_NC is None:
        dlogits_NC = h_ND.new_zeros(h_ND.shape[0], weight_CD.shape[0])
    dh_ND, dw_D, dW_CD = _norm_and_router_backward(h_ND, norm_weight, weight_CD, dx_ND, dlogits_NC.float(), ctx.eps)
    db_C = dlogits_NC.float().sum(0) if ctx.has_bias else None
    return dh_ND, dw_D, dW_CD, db_C, None, None


_norm_and_router.register_autograd(_backward, setup_context=_setup_context)


def norm_and_router(h_ND: Tensor, norm_weight: Tensor, eps: float, weight_CD: Tensor, bias_C: Tensor | None = None,
                    dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(x, logits)``: ``x = RMSNorm(h)`` (float32 arithmetic) in ``dtype`` (default
    ``h``'s), and the float32 router logits ``RMSNorm(h) Wᵀ + b`` (N, C), from one read of
    the float32 ``h`` (N, D); differentiable in ``h``, the norm weight, ``W`` and ``b``."""
    return _norm_and_router(h_ND, norm_weight.float(), weight_CD.float(), None if bias_C is None else bias_C.float(),
                            float(eps), dtype or h_ND.dtype)
