"""SwiGLU's hidden units in one pass: ``h = silu(g) ⊙ u``, optionally times a per-block
scale ``s[n, j // b]`` (DSMoE's gates on the blocks of a dense FFN).

Unfused, PyTorch runs ``silu`` and the product as two kernels and keeps ``g``, ``silu(g)``
and ``u`` for the backward, which takes three more passes. The Triton kernels read
``g`` and ``u`` once and write ``h`` once; the backward reads ``dh, g, u`` and writes
``dg, du`` (and the block sums ``ds``) in one pass, recomputing ``silu`` instead of
storing it: about half the bytes, a third less activation memory.

Kernel → launcher → ``torch.library.custom_op`` (fake implementation, so
``torch.compile`` traces it as one op) → autograd registration. The plain PyTorch
formula in ``finemoe.layers.common.swiglu_hidden`` is the reference; the tests run these
kernels on the CPU under ``TRITON_INTERPRET=1``.

Derivatives, with σ = sigmoid(g):  ∂h/∂u = silu(g)·s,  ∂h/∂g = u·s·σ·(1 + g·(1 − σ)),
∂h/∂s = silu(g)·u (summed over the block's columns).

Shapes: R rows, C columns, n blocks of b = C / n columns (n = 1 without a scale).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference formula is used instead
    triton = None

__all__ = ["fused_swiglu", "fused_swiglu_packed", "fused_swiglu_wanted", "triton_kernels_available"]

_BLOCK = 1024


def triton_kernels_available(x: Tensor) -> bool:
    """Whether the layers use finemoe's Triton kernels (this one, ``dsmoe_decode``,
    ``finedeep_gate``) for ``x``: Triton is installed, ``x`` is on a GPU in a floating
    dtype, and ``FINEMOE_KERNELS`` is not ``0`` (which selects the reference formulas
    everywhere)."""
    if triton is None or os.environ.get("FINEMOE_KERNELS", "1") == "0":
        return False
    return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def fused_swiglu_wanted(x: Tensor, scale: Tensor | None = None) -> bool:
    """Whether SwiGLU's hidden units should come from these kernels: where the Triton
    kernels run, except for a plain SwiGLU (no ``scale``) while ``torch.compile`` traces.
    There Inductor writes the same element-wise pass and fuses it with the neighbouring
    casts, which an opaque custom op prevents: the compiled dense FFN layer ran in 2.54 ms
    with Inductor's SwiGLU against 3.13 ms with this kernel (16,384 tokens, d = 1024,
    H100). With a per-row or per-block scale (routing weights, DSMoE's gates) the kernel
    stays: Inductor's broadcast product made the compiled DSMoE layer 3.80 ms against
    2.97 (benchmarks/NOTES.md)."""
    return triton_kernels_available(x) and (scale is not None or not torch.compiler.is_compiling())


if triton is not None:
    # One program per (row, block of columns); a block (DSMoE's, or a tile of up to
    # _BLOCK columns without a scale) is covered by NUM_TILES tiles, a compile-time count.

    @triton.jit
    def _swiglu_forward_kernel(g_ptr, u_ptr, s_ptr, h_ptr, C, b, n, IN_STRIDE, U_OFFSET, COL_STRIDE: tl.constexpr,
                               HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, NUM_TILES: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        if HAS_SCALE:
            scale = tl.load(s_ptr + row * n + blk).to(tl.float32)
        for tile in tl.static_range(NUM_TILES):
            within = tile * BLOCK + tl.arange(0, BLOCK)
            cols = blk * b + within
            mask = (within < b) & (cols < C)
            g = tl.load(g_ptr + row * IN_STRIDE + cols * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + U_OFFSET + row * IN_STRIDE + cols * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
            h = g * tl.sigmoid(g) * u
            if HAS_SCALE:
                h = h * scale
            tl.store(h_ptr + row * C + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, s_ptr, dg_ptr, du_ptr, ds_ptr, C, b, n, IN_STRIDE, U_OFFSET,
                                COL_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                                NUM_TILES: tl.constexpr, PACKED: tl.constexpr):
        # PACKED: both gradients go to dg_ptr (du at U_OFFSET), du_ptr is not written. One
        # output tensor passed once: a compiler that functionalises the kernel's writes
        # (``triton_op``) must not see two arguments aliasing one buffer. (No default
        # values for kernel arguments: Inductor's launcher of traced kernels miscounts them.)
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(s_ptr + row * n + blk).to(tl.float32)
        ds = tl.zeros((BLOCK,), dtype=tl.float32)
        for tile in tl.static_range(NUM_TILES):
            within = tile * BLOCK + tl.arange(0, BLOCK)
            cols = blk * b + within
            mask = (within < b) & (cols < C)
            dh = tl.load(dh_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * IN_STRIDE + cols * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + U_OFFSET + row * IN_STRIDE + cols * COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            du = (dh * silu * scale).to(dg_ptr.dtype.element_ty)
            if PACKED:
                tl.store(dg_ptr + U_OFFSET + row * IN_STRIDE + cols * COL_STRIDE, du, mask=mask)
            else:
                tl.store(du_ptr + U_OFFSET + row * IN_STRIDE + cols * COL_STRIDE, du, mask=mask)
            dg = dh * u * scale * sig * (1.0 + g * (1.0 - sig))
            tl.store(dg_ptr + row * IN_STRIDE + cols * COL_STRIDE, dg.to(dg_ptr.dtype.element_ty), mask=mask)
            if HAS_SCALE:
                ds += dh * silu * u
        if HAS_SCALE:
            tl.store(ds_ptr + row * n + blk, tl.sum(ds, axis=0))


def _launch(C: int, R: int, scale: Tensor | None, packed: bool = False,
            interleaved: bool = False) -> tuple[tuple[int, int], dict]:
    """The grid and sizes for R rows of C hidden units: a program per (row, block) with a
    scale, else per (row, tile). ``packed``: gate and up are the two halves of one
    ``(R, 2C)`` tensor (and so are their gradients); ``interleaved``: its even and odd
    columns."""
    in_stride, u_offset, col_stride = (2 * C, 1, 2) if interleaved else (2 * C, C, 1) if packed else (C, 0, 1)
    layout = dict(C=C, IN_STRIDE=in_stride, U_OFFSET=u_offset, COL_STRIDE=col_stride)
    if scale is None:
        block = min(_BLOCK, triton.next_power_of_2(C))
        return (R, triton.cdiv(C, block)), dict(layout, b=block, n=1, HAS_SCALE=False, BLOCK=block, NUM_TILES=1)
    n = scale.shape[-1]
    b = C // n
    block = min(_BLOCK, triton.next_power_of_2(b))
    return (R, n), dict(layout, b=b, n=n, HAS_SCALE=True, BLOCK=block, NUM_TILES=triton.cdiv(b, block))


@kernel_op("finemoe::swiglu", mutates_args=())
def _swiglu(gate: Tensor, up: Tensor, scale: Tensor | None) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    grid, sizes = _launch(gate.shape[-1], gate.numel() // gate.shape[-1], scale)
    hidden = torch.empty_like(gate)
    if hidden.numel() == 0:
        return hidden
    s = scale.contiguous() if scale is not None else gate  # a placeholder pointer when there is no scale
    launch(_swiglu_forward_kernel)[grid](gate, up, s, hidden, **sizes)
    return hidden


@fake(_swiglu)
def _(gate: Tensor, up: Tensor, scale: Tensor | None) -> Tensor:
    return torch.empty_like(gate)


@kernel_op("finemoe::swiglu_backward", mutates_args=())
def _swiglu_backward(grad: Tensor, gate: Tensor, up: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    grid, sizes = _launch(gate.shape[-1], gate.numel() // gate.shape[-1], scale)
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    d_scale = torch.zeros(grid[0], sizes["n"], dtype=torch.float32, device=gate.device)
    if grad.numel() == 0:
        return d_gate, d_up, d_scale
    s = scale.contiguous() if scale is not None else gate
    launch(_swiglu_backward_kernel)[grid](grad, gate, up, s, d_gate, d_up, d_scale, **sizes, PACKED=False)
    return d_gate, d_up, d_scale


@fake(_swiglu_backward)
def _(grad: Tensor, gate: Tensor, up: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    n = 1 if scale is None else scale.shape[-1]
    return torch.empty_like(gate), torch.empty_like(up), gate.new_empty(gate.numel() // gate.shape[-1], n,
                                                                        dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, scale = inputs
    ctx.save_for_backward(gate, up, scale)
    ctx.has_scale = scale is not None


def _backward(ctx, grad: Tensor):
    gate, up, scale = ctx.saved_tensors
    d_gate, d_up, d_scale = _swiglu_backward(grad, gate, up, scale if ctx.has_scale else None)
    return d_gate, d_up, d_scale.view(scale.shape).to(scale.dtype) if ctx.has_scale else None


_swiglu.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("finemoe::swiglu_packed", mutates_args=())
def _swiglu_packed(gate_up: Tensor, scale: Tensor | None, interleaved: bool) -> Tensor:
    gate_up = gate_up.contiguous()
    C = gate_up.shape[-1] // 2
    grid, sizes = _launch(C, gate_up.numel() // (2 * C), scale, packed=True, interleaved=interleaved)
    hidden = gate_up.new_empty(*gate_up.shape[:-1], C)
    if hidden.numel() == 0:
        return hidden
    s = scale.contiguous() if scale is not None else gate_up
    launch(_swiglu_forward_kernel)[grid](gate_up, gate_up, s, hidden, **sizes)
    return hidden


@fake(_swiglu_packed)
def _(gate_up: Tensor, scale: Tensor | None, interleaved: bool) -> Tensor:
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@kernel_op("finemoe::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward(grad: Tensor, gate_up: Tensor, scale: Tensor | None,
                            interleaved: bool) -> tuple[Tensor, Tensor]:
    grad, gate_up = grad.contiguous(), gate_up.contiguous()
    C = gate_up.shape[-1] // 2
    grid, sizes = _launch(C, gate_up.numel() // (2 * C), scale, packed=True, interleaved=interleaved)
    d_gate_up = torch.empty_like(gate_up)
    d_scale = torch.zeros(grid[0], sizes["n"], dtype=torch.float32, device=gate_up.device)
    if grad.numel() == 0:
        return d_gate_up, d_scale
    s = scale.contiguous() if scale is not None else gate_up
    launch(_swiglu_backward_kernel)[grid](grad, gate_up, gate_up, s, d_gate_up, grad, d_scale, **sizes,
                                          PACKED=True)
    return d_gate_up, d_scale


@fake(_swiglu_packed_backward)
def _(grad: Tensor, gate_up: Tensor, scale: Tensor | None, interleaved: bool) -> tuple[Tensor, Tensor]:
    n = 1 if scale is None else scale.shape[-1]
    return torch.empty_like(gate_up), gate_up.new_empty(gate_up.numel() // gate_up.shape[-1], n, dtype=torch.float32)


def _setup_packed_context(ctx, inputs, output) -> None:
    gate_up, scale, ctx.interleaved = inputs
    ctx.save_for_backward(gate_up, scale)
    ctx.has_scale = scale is not None


def _packed_backward(ctx, grad: Tensor):
    gate_up, scale = ctx.saved_tensors
    d_gate_up, d_scale = _swiglu_packed_backward(grad, gate_up, scale if ctx.has_scale else None, ctx.interleaved)
    return d_gate_up, d_scale.view(scale.shape).to(scale.dtype) if ctx.has_scale else None, None


_swiglu_packed.register_autograd(_packed_backward, setup_context=_setup_packed_context)


def fused_swiglu(gate: Tensor, up: Tensor, scale: Tensor | None = None) -> Tensor:
    """``silu(gate) ⊙ up`` (times ``scale[..., j // b]`` on block j of the columns), in the
    dtype of ``gate``. ``scale``: ``(rows, n)``, n dividing the width."""
    if scale is not None:
        scale = scale.reshape(gate.numel() // gate.shape[-1], scale.shape[-1])
        if gate.shape[-1] % scale.shape[-1]:
            raise ValueError(f"{scale.shape[-1]} blocks do not divide a width of {gate.shape[-1]}")
    return _swiglu(gate, up.to(gate.dtype), scale)


def fused_swiglu_packed(gate_up: Tensor, scale: Tensor | None = None, *, interleaved: bool = False) -> Tensor:
    """``fused_swiglu(gate, up, scale)`` where ``gate_up`` is ``[gate | up]`` along the
    last axis (one GEMM computed both), or with ``interleaved`` gate column j at 2j and
    up column j at 2j + 1 (a GEMM against ``SwiGLUExperts.w_gate_up``): no copy of
    either, and the gradient comes back as one tensor of the same layout."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"a packed gate/up tensor has an even width, got {gate_up.shape[-1]}")
    if scale is not None:
        scale = scale.reshape(gate_up.numel() // gate_up.shape[-1], scale.shape[-1])
        if (gate_up.shape[-1] // 2) % scale.shape[-1]:
            raise ValueError(f"{scale.shape[-1]} blocks do not divide a width of {gate_up.shape[-1] // 2}")
    return _swiglu_packed(gate_up, scale, interleaved)
