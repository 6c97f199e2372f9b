"""Finedeep's output-guided gate in one pass over the hidden units (METHODS.md §1).

For each token, with the hidden units of the K experts ``h_k ∈ R^f`` and each expert's
read-out ``r_k = W_{d,k} w_k`` (so that ``w_k · e_k = h_k · r_k``):

    z_k = h_k · r_k                     scores, accumulated in float32
    g   = gate(z)                       sigmoid, optionally normalised (g_k = c·s_k / Σ s),
                                        or c·softmax(z); c = K with gate_sum = "experts"
    out = [g_1 h_1, ..., g_K h_K]       the hidden units scaled by their expert's gate

Unfused this is a thin GEMM for the scores, a dozen small element-wise kernels for the
gates and a broadcast product over the hidden units, each with its backward. The
forward kernel reads each token's hidden units twice (the second read from L2) and
writes them once; the backward kernel reads ``d out`` and ``h`` and writes ``d h``:

    dg_k = d out_k · h_k
    dz   = the gate's Jacobian applied to dg
    dh_k = d out_k · g_k + dz_k · r_k

``d r = Σ_n dz_n ⊗ h_n`` is a reduction over tokens, left to one batched product.

Kernel → launcher → ``torch.library.custom_op`` (fake implementation) → autograd. The
reference is the plain PyTorch code in ``FinedeepFFN.sublayer``; the tests compare the
two under ``TRITON_INTERPRET=1`` on the CPU. The layer uses it on a GPU unless
``gate_kernel: false`` (measured against the PyTorch path in benchmarks/NOTES.md).

Shapes: N tokens, K experts, f expert width, F = K·f.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["finedeep_gate"]

_BLOCK_F = 256


if triton is not None:

    @triton.jit
    def _gate_values(z, kmask, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr, C: tl.constexpr):
        """``(g, s)``: the gates and the sigmoid (or softmax) values they are made of."""
        if SOFTMAX:
            zm = tl.where(kmask, z, float("-inf"))
            e = tl.exp(zm - tl.max(zm, axis=0))
            p = e / tl.sum(e, axis=0)
            return C * p, p
        s = tl.where(kmask, tl.sigmoid(z), 0.0)
        if NORMALIZE:
            return C * s / tl.sum(s, axis=0), s
        return s, s

    @triton.jit
    def _forward_kernel(h_ptr, r_ptr, out_ptr, g_ptr, z_ptr, K: tl.constexpr, f: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK: tl.constexpr, NUM_T: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                        C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        kmask = ks < K
        z = tl.zeros((K_PAD,), dtype=tl.float32)
        for t in tl.static_range(NUM_T):
            fs = t * BLOCK + tl.arange(0, BLOCK)
            m = kmask[:, None] & (fs < f)[None, :]
            h = tl.load(h_ptr + row * (K * f) + ks[:, None] * f + fs[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + ks[:, None] * f + fs[None, :], mask=m, other=0.0)
            z += tl.sum(h * r, axis=1)
        g, s = _gate_values(z, kmask, SOFTMAX, NORMALIZE, C)
        tl.store(g_ptr + row * K + ks, g, mask=kmask)
        tl.store(z_ptr + row * K + ks, z, mask=kmask)
        for t in tl.static_range(NUM_T):
            fs = t * BLOCK + tl.arange(0, BLOCK)
            m = kmask[:, None] & (fs < f)[None, :]
            offsets = row * (K * f) + ks[:, None] * f + fs[None, :]
            h = tl.load(h_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, (h * g[:, None]).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _backward_kernel(dout_ptr, h_ptr, r_ptr, z_ptr, dg_extra_ptr, dh_ptr, dz_ptr, K: tl.constexpr,
                         f: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, NUM_T: tl.constexpr,
                         SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr, C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        kmask = ks < K
        z = tl.load(z_ptr + row * K + ks, mask=kmask, other=0.0)
        g, s = _gate_values(z, kmask, SOFTMAX, NORMALIZE, C)
        dg = tl.load(dg_extra_ptr + row * K + ks, mask=kmask, other=0.0)
        for t in tl.static_range(NUM_T):
            fs = t * BLOCK + tl.arange(0, BLOCK)
            m = kmask[:, None] & (fs < f)[None, :]
            offsets = row * (K * f) + ks[:, None] * f + fs[None, :]
            dout = tl.load(dout_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            dg += tl.sum(dout * h, axis=1)
        if SOFTMAX:  # g = C·p:  dz_j = C·p_j (dg_j − Σ_k dg_k p_k)
            dz = C * s * (dg - tl.sum(dg * s, axis=0))
        elif NORMALIZE:  # g = C·s/S:  ds_j = (C/S) dg_j − (C/S²) Σ_k dg_k s_k;  dz = ds·s(1 − s)
            total = tl.sum(s, axis=0)
            ds = C / total * dg - C / (total * total) * tl.sum(dg * s, axis=0)
            dz = ds * s * (1.0 - s)
        else:
            dz = dg * s * (1.0 - s)
        dz = tl.where(kmask, dz, 0.0)
        tl.store(dz_ptr + row * K + ks, dz, mask=kmask)
        for t in tl.static_range(NUM_T):
            fs = t * BLOCK + tl.arange(0, BLOCK)
            m = kmask[:, None] & (fs < f)[None, :]
            offsets = row * (K * f) + ks[:, None] * f + fs[None, :]
            dout = tl.load(dout_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + ks[:, None] * f + fs[None, :], mask=m, other=0.0)
            dh = dout * g[:, None] + dz[:, None] * r
            tl.store(dh_ptr + offsets, dh.to(dh_ptr.dtype.element_ty), mask=m)


def _sizes(K: int, f: int, softmax: bool, normalize: bool, scale: float) -> dict:
    block = min(_BLOCK_F, triton.next_power_of_2(f))
    return dict(K=K, f=f, K_PAD=max(2, triton.next_power_of_2(K)), BLOCK=block, NUM_T=triton.cdiv(f, block),
                SOFTMAX=softmax, NORMALIZE=normalize, C=scale)


@kernel_op("finemoe::finedeep_gate", mutates_args=())
def _gate(hidden: Tensor, readout: Tensor, softmax: bool, normalize: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    hidden, readout = hidden.contiguous(), readout.float().contiguous()
    N, (K, f) = hidden.shape[0], readout.shape
    out = torch.empty_like(hidden)
    gates = torch.empty(N, K, dtype=torch.float32, device=hidden.device)
    scores = torch.empty(N, K, dtype=torch.float32, device=hidden.device)
    if N:
        launch(_forward_kernel)[(N,)](hidden, readout, out, gates, scores, **_sizes(K, f, softmax, normalize, scale))
    return out, gates, scores


@fake(_gate)
def _(hidden, readout, softmax, normalize, scale):
    N, K = hidden.shape[0], readout.shape[0]
    return (torch.empty_like(hidden), hidden.new_empty(N, K, dtype=torch.float32),
            hidden.new_empty(N, K, dtype=torch.float32))


@kernel_op("finemoe::finedeep_gate_backward", mutates_args=())
def _gate_backward(grad_out: Tensor, grad_gates: Tensor, hidden: Tensor, readout: Tensor, scores: Tensor, softmax: bool,
                   normalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    grad_out, hidden = grad_out.contiguous(), hidden.contiguous()
    readout = readout.float().contiguous()
    N, (K, f) = hidden.shape[0], readout.shape
    grad_hidden = torch.empty_like(hidden)
    grad_scores = torch.empty(N, K, dtype=torch.float32, device=hidden.device)
    if N:
        launch(_backward_kernel)[(N,)](grad_out, hidden, readout, scores, grad_gates.float().contiguous(), grad_hidden,
                               grad_scores, **_sizes(K, f, softmax, normalize, scale))
    return grad_hidden, grad_scores


@fake(_gate_backward)
def _(grad_out, grad_gates, hidden, readout, scores, softmax, normalize, scale):
    return torch.empty_like(hidden), scores.new_empty(scores.shape)


def _setup_context(ctx, inputs, output) -> None:
    hidden, readout, softmax, normalize, scale = inputs
    ctx.save_for_backward(hidden, readout, output[2])
    ctx.options = (softmax, normalize, scale)


def _backward(ctx, grad_out, grad_gates, grad_scores_unused):
    hidden, readout, scores = ctx.saved_tensors
    if grad_gates is None:
        grad_gates = torch.zeros_like(scores)
    grad_hidden, grad_scores = _gate_backward(grad_out, grad_gates, hidden, readout, scores, *ctx.options)
    K, f = readout.shape
    # d r_k = Σ_n dz_nk h_nk: one batched product over the tokens
    grad_readout = torch.einsum("nk,nkf->kf", grad_scores.to(hidden.dtype), hidden.view(-1, K, f))
    return grad_hidden, grad_readout.to(readout.dtype), None, None, None


_gate.register_autograd(_backward, setup_context=_setup_context)


def finedeep_gate(hidden_NF: Tensor, readout_Kf: Tensor, *, softmax: bool, normalize: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    """``(hidden scaled by each expert's gate (N, F), gates (N, K) float32)``."""
    out, gates, _ = _gate(hidden_NF, readout_Kf, softmax, normalize, float(scale))
    return out, gates
