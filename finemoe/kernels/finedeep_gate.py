"""Finedeep's SwiGLU and output-guided gate in one pass over the hidden units (METHODS.md §1).

For each token, with the gate and up projections of the K experts ``a_k, u_k ∈ R^f``,
the hidden units ``h_k = silu(a_k) ⊙ u_k`` and each expert's read-out ``r_k = W_{d,k}
w_k`` (so that ``w_k · e_k = h_k · r_k``):

    z_k = h_k · r_k                     scores, accumulated in float32
    g   = gate(z)                       sigmoid, optionally normalised (g_k = c·s_k / Σ s),
                                        or c·softmax(z); c = K with gate_sum = "experts"
    out = [g_1 h_1, ..., g_K h_K]       the hidden units scaled by their expert's gate

Unfused this is SwiGLU's element-wise pass, a thin GEMM for the scores, a dozen small
element-wise kernels for the gates and a broadcast product over the hidden units, each
with its backward, and the hidden units written and read back in between. Here one
program holds a token's K·f units in registers: the forward reads ``a`` and ``u`` once
and writes ``out`` once (the hidden units are never stored: the backward recomputes
them); the backward reads ``d out``, ``a`` and ``u`` once and writes ``d a`` and ``d u``:

    dg_k = d out_k · h_k
    dz   = the gate's Jacobian applied to dg
    dh_k = d out_k · g_k + dz_k · r_k
    d u  = dh ⊙ silu(a),   d a = dh ⊙ u ⊙ silu'(a)

``d r = Σ_n dz_n ⊗ h_n`` is a reduction over tokens: each backward program sums it over
its ``_ROWS`` tokens, and the per-program partial sums are added after (a fixed order:
deterministic, no atomics).

Kernel → launcher → operator (``finemoe.kernels.op``) → autograd. The reference is the
plain PyTorch code in ``FinedeepFFN.sublayer``; the tests compare the two under
``TRITON_INTERPRET=1`` on the CPU and on the GPU. A token's units must fit one register
tile (``swiglu_gate_applies``: K·f up to 8,192 after padding to powers of two); wider
sub-layers take the PyTorch path.

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

__all__ = ["finedeep_swiglu_gate", "swiglu_gate_applies"]

_MAX_TILE = 8192
"""Most padded K·f units one program holds (beyond it registers spill)."""
_ROWS = 16
"""Tokens per backward program: the read-out gradient's partial sums are (N / _ROWS, K, f)."""


def _tile(K: int, f: int) -> tuple[int, int]:
    return max(2, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(f))


def swiglu_gate_applies(K: int, f: int) -> bool:
    """Whether a token's K·f hidden units fit the kernels' register tile."""
    if triton is None:
        return False
    K_PAD, F_PAD = _tile(K, f)
    return K_PAD * F_PAD <= _MAX_TILE


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
    def _hidden(a_ptr, u_ptr, offsets, m):
        """``(silu(a), sigmoid(a), a, u)`` in float32 for one token's tile."""
        a = tl.load(a_ptr + offsets, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offsets, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        return a * sig, sig, a, u

    @triton.jit
    def _forward_kernel(a_ptr, u_ptr, r_ptr, out_ptr, g_ptr, z_ptr, K: tl.constexpr, f: tl.constexpr,
                        K_PAD: tl.constexpr, F_PAD: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                        C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        fs = tl.arange(0, F_PAD)
        kmask = ks < K
        m = kmask[:, None] & (fs < f)[None, :]
        offsets = row * (K * f) + ks[:, None] * f + fs[None, :]
        act, _, _, u = _hidden(a_ptr, u_ptr, offsets, m)
        h = act * u
        r = tl.load(r_ptr + ks[:, None] * f + fs[None, :], mask=m, other=0.0)
        z = tl.sum(h * r, axis=1)
        g, _ = _gate_values(z, kmask, SOFTMAX, NORMALIZE, C)
        tl.store(g_ptr + row * K + ks, g, mask=kmask)
        tl.store(z_ptr + row * K + ks, z, mask=kmask)
        tl.store(out_ptr + offsets, (h * g[:, None]).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _backward_kernel(dout_ptr, a_ptr, u_ptr, r_ptr, z_ptr, dg_extra_ptr, da_ptr, du_ptr, dr_ptr, N,
                         K: tl.constexpr, f: tl.constexpr, K_PAD: tl.constexpr, F_PAD: tl.constexpr,
                         ROWS: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr, C: tl.constexpr,
                         STAGES: tl.constexpr):
        program = tl.program_id(0)
        ks = tl.arange(0, K_PAD)
        fs = tl.arange(0, F_PAD)
        kmask = ks < K
        tile_mask = kmask[:, None] & (fs < f)[None, :]
        r = tl.load(r_ptr + ks[:, None] * f + fs[None, :], mask=tile_mask, other=0.0)
        dr = tl.zeros((K_PAD, F_PAD), dtype=tl.float32)
        for i in tl.range(0, ROWS, num_stages=STAGES):
            row = program.to(tl.int64) * ROWS + i
            live = (row + ks * 0) < N  # as a vector: the interpreter masks with vectors only
            km = kmask & live
            m = tile_mask & live[:, None]
            offsets = row * (K * f) + ks[:, None] * f + fs[None, :]
            z = tl.load(z_ptr + row * K + ks, mask=km, other=0.0)
            g, s = _gate_values(z, kmask, SOFTMAX, NORMALIZE, C)
            dout = tl.load(dout_ptr + offsets, mask=m, other=0.0).to(tl.float32)
            act, sig, a, u = _hidden(a_ptr, u_ptr, offsets, m)
            h = act * u
            dg = tl.load(dg_extra_ptr + row * K + ks, mask=km, other=0.0) + tl.sum(dout * h, axis=1)
            if SOFTMAX:  # g = C·p:  dz_j = C·p_j (dg_j − Σ_k dg_k p_k)
                dz = C * s * (dg - tl.sum(dg * s, axis=0))
            elif NORMALIZE:  # g = C·s/S:  ds_j = (C/S) dg_j − (C/S²) Σ_k dg_k s_k;  dz = ds·s(1 − s)
                total = tl.sum(s, axis=0)
                ds = C / total * dg - C / (total * total) * tl.sum(dg * s, axis=0)
                dz = ds * s * (1.0 - s)
            else:
                dz = dg * s * (1.0 - s)
            dz = tl.where(km, dz, 0.0)
            dh = dout * g[:, None] + dz[:, None] * r
            tl.store(du_ptr + offsets, (dh * act).to(du_ptr.dtype.element_ty), mask=m)
            # silu'(a) = σ(a) (1 + a (1 − σ(a)))
            tl.store(da_ptr + offsets, (dh * u * sig * (1.0 + a * (1.0 - sig))).to(da_ptr.dtype.element_ty), mask=m)
            dr += dz[:, None] * h
        tl.store(dr_ptr + program.to(tl.int64) * (K * f) + ks[:, None] * f + fs[None, :], dr, mask=tile_mask)


def _backward_launch(K: int, f: int) -> dict:
    """Warps and pipeline stages of the backward kernel by the padded tile, the fastest
    measured at 16,384 tokens (benchmarks/experiments/finedeep_gate_tiles.py, µs). With
    the token loop pipelined 3 deep (the next tokens' loads in flight while one is
    computed): 1,024 units 62 (68 unpipelined), 2,048 units 122 (4 warps; 150 at the best
    unpipelined tile). Wider tiles were measured unpipelined only: 16 warps, 371 / 628 at
    4,096 / 8,192 units (8 warps: 478 / 836)."""
    K_PAD, F_PAD = _tile(K, f)
    return {"num_warps": 4, "STAGES": 3} if K_PAD * F_PAD <= 2048 else {"num_warps": 16, "STAGES": 1}


def _sizes(K: int, f: int, softmax: bool, normalize: bool, scale: float) -> dict:
    K_PAD, F_PAD = _tile(K, f)
    return {"K": K, "f": f, "K_PAD": K_PAD, "F_PAD": F_PAD, "SOFTMAX": softmax, "NORMALIZE": normalize, "C": scale,
            "num_warps": 4 if K_PAD * F_PAD <= 2048 else 8}


@kernel_op("finemoe::finedeep_swiglu_gate", mutates_args=())
def _swiglu_gate(gate: Tensor, up: Tensor, readout: Tensor, softmax: bool, normalize: bool,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    gate, up, readout = gate.contiguous(), up.contiguous(), readout.float().contiguous()
    N, (K, f) = gate.shape[0], readout.shape
    out = torch.empty_like(gate)
    gates = torch.empty(N, K, dtype=torch.float32, device=gate.device)
    scores = torch.empty(N, K, dtype=torch.float32, device=gate.device)
    if N:
        launch(_forward_kernel)[(N,)](gate, up, readout, out, gates, scores, **_sizes(K, f, softmax, normalize, scale))
    return out, gates, scores


@fake(_swiglu_gate)
def _(gate, up, readout, softmax, normalize, scale):
    N, K = gate.shape[0], readout.shape[0]
    return (torch.empty_like(gate), gate.new_empty(N, K, dtype=torch.float32),
            gate.new_empty(N, K, dtype=torch.float32))


@kernel_op("finemoe::finedeep_swiglu_gate_backward", mutates_args=())
def _swiglu_gate_backward(grad_out: Tensor, grad_gates: Tensor, gate: Tensor, up: Tensor, readout: Tensor,
                          scores: Tensor, softmax: bool, normalize: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    readout = readout.float().contiguous()
    N, (K, f) = gate.shape[0], readout.shape
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    programs = triton.cdiv(N, _ROWS)
    partial_readout = torch.empty(programs, K, f, dtype=torch.float32, device=gate.device)
    if N:
        launch(_backward_kernel)[(programs,)](grad_out, gate, up, readout, scores, grad_gates.float().contiguous(),
                                              grad_gate, grad_up, partial_readout, N, ROWS=_ROWS,
                                              **_sizes(K, f, softmax, normalize, scale) | _backward_launch(K, f))
    return grad_gate, grad_up, partial_readout.sum(0)


@fake(_swiglu_gate_backward)
def _(grad_out, grad_gates, gate, up, readout, scores, softmax, normalize, scale):
    return torch.empty_like(gate), torch.empty_like(up), readout.new_empty(readout.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, readout, softmax, normalize, scale = inputs
    ctx.save_for_backward(gate, up, readout, output[2])
    ctx.options = (softmax, normalize, scale)


def _backward(ctx, grad_out, grad_gates, grad_scores_unused):
    gate, up, readout, scores = ctx.saved_tensors
    if grad_gates is None:
        grad_gates = torch.zeros_like(scores)
    grad_gate, grad_up, grad_readout = _swiglu_gate_backward(grad_out, grad_gates, gate, up, readout, scores,
                                                             *ctx.options)
    return grad_gate, grad_up, grad_readout.to(readout.dtype), None, None, None


_swiglu_gate.register_autograd(_backward, setup_context=_setup_context)


def finedeep_swiglu_gate(gate_NF: Tensor, up_NF: Tensor, readout_Kf: Tensor, *, softmax: bool, normalize: bool,
                         scale: float) -> tuple[Tensor, Tensor]:
    """``(the hidden units silu(gate) ⊙ up scaled by each expert's gate (N, F) in gate's
    dtype, the gates (N, K) in float32)``."""
    out, gates, _ = _swiglu_gate(gate_NF, up_NF, readout_Kf, softmax, normalize, float(scale))
    return out, gates
