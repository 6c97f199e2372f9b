"""DSMoE inference for a few tokens (decoding): only the weights of switched-on blocks are read.

Decoding is bound by reading weights, and a dense FFN reads all of them (under autocast
it first copies them to bf16). DSMoE's claim is that inactive blocks cost nothing, so
three Triton kernels, with no host sync (a CUDA graph can capture them), read each
block's weights only if some token of the batch switched the block on:

1. ``gates``: one program: every token's gates ``a = sigmoid(u Y)``, ``G(a) = a·[a > τ]``
   and the weight ``G · n / #active`` (or ``G`` without rescaling) of each block.
2. ``up``: one program per (tile of ``BLOCK_F`` hidden units, chunk of ``BLOCK_K`` inputs):
   if a token switched the tile's block on, the chunk's partial products ``u W_g`` and
   ``u W_u``. Split over the inputs so that ~1,000 programs each read one slab of the
   weights: with one program per tile walking all of D (and each recomputing the gates)
   the kernels were bound by latency, not bytes (96.6 µs at best against the dense
   FFN's 70.8 as CUDA graphs; benchmarks/experiments/dsmoe_decode.py).
3. ``down``: one program per (tile of ``BLOCK_D`` outputs, block): if some token switched
   the block on, the block's hidden units ``silu(Σ u W_g) ⊙ Σ u W_u · weight`` from the
   partial sums (in a fixed order) and their product with ``W_d``'s block, else zero;
   the n partial outputs are then added in a fixed order. Blocks no token uses are
   never read.

Float32 accumulation throughout; the weights are read in their own dtype. The layer's
``sparse_forward`` (tokens grouped by block, grouped GEMMs) is the reference; tests run
these kernels on the CPU under ``TRITON_INTERPRET=1``.

Shapes: N tokens (≤ MAX_TOKENS), D model width, F = n·b FFN width, n blocks of b,
KC = D / BLOCK_K input chunks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["MAX_TOKENS", "dsmoe_decode", "dsmoe_decode_applies"]

MAX_TOKENS = 16
_BLOCK_F, _BLOCK_K, _BLOCK_D = 32, 256, 32  # fastest of 36 points (H100, d = 1024, F = 4096, n = 8;
_NUM_WARPS = 4                               # results/experiments/dsmoe_decode/); BLOCK_K shrinks to divide D


def dsmoe_decode_applies(u_ND: Tensor, block_width: int) -> bool:
    """Few tokens, and widths the tiles divide."""
    return (triton is not None and u_ND.shape[0] <= MAX_TOKENS and block_width % _BLOCK_F == 0
            and u_ND.shape[1] % _BLOCK_D == 0)


if triton is not None:

    @triton.jit
    def _gates_kernel(u_ptr, y_ptr, tau, g_out_ptr, w_out_ptr, N: tl.constexpr, D: tl.constexpr, n: tl.constexpr,
                      RESCALE: tl.constexpr, N_PAD: tl.constexpr, n_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
        tokens = tl.arange(0, N_PAD)
        blocks = tl.arange(0, n_PAD)
        token_ok = tokens < N
        logits = tl.zeros((N_PAD, n_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            ds = d0 + tl.arange(0, BLOCK_K)
            u = tl.load(u_ptr + tokens[:, None] * D + ds[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
            y = tl.load(y_ptr + blocks[None, :] * D + ds[:, None], mask=(blocks < n)[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(u[:, :, None] * y[None, :, :], axis=1)
        a = tl.sigmoid(logits)
        valid = token_ok[:, None] & (blocks < n)[None, :]
        on = (a > tau) & valid
        gates = tl.where(on, a, 0.0)
        scale = tl.full((N_PAD,), 1.0, tl.float32)
        if RESCALE:
            count = tl.sum(on.to(tl.float32), axis=1)
            scale = tl.where(count > 0, n / tl.maximum(count, 1.0), 0.0)
        out = tokens[:, None] * n + blocks[None, :]
        tl.store(g_out_ptr + out, gates, mask=valid)
        tl.store(w_out_ptr + out, gates * scale[:, None], mask=valid)

    @triton.jit
    def _up_kernel(u_ptr, w_ptr, wg_ptr, wu_ptr, pg_ptr, pu_ptr, N: tl.constexpr, D: tl.constexpr, n: tl.constexpr,
                   b: tl.constexpr, N_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (tile, chunk): the chunk's share of u W_g and u W_u for the tile's hidden
        # units, if some token switched the tile's block on (else nothing is read or written)
        pid, kc = tl.program_id(0), tl.program_id(1)
        f0 = pid * BLOCK_F
        tokens = tl.arange(0, N_PAD)
        token_ok = tokens < N
        weight = tl.load(w_ptr + tokens * n + f0 // b, mask=token_ok, other=0.0)
        if tl.sum((weight != 0).to(tl.int32), axis=0) > 0:
            fs = f0 + tl.arange(0, BLOCK_F)
            ds = kc * BLOCK_K + tl.arange(0, BLOCK_K)
            u = tl.load(u_ptr + tokens[:, None] * D + ds[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
            wg = tl.load(wg_ptr + fs[:, None] * D + ds[None, :]).to(tl.float32)
            wu = tl.load(wu_ptr + fs[:, None] * D + ds[None, :]).to(tl.float32)
            out = (kc * N + tokens[:, None]) * (n * b) + fs[None, :]
            tl.store(pg_ptr + out, tl.sum(u[:, None, :] * wg[None, :, :], axis=2), mask=token_ok[:, None])
            tl.store(pu_ptr + out, tl.sum(u[:, None, :] * wu[None, :, :], axis=2), mask=token_ok[:, None])

    @triton.jit
    def _down_kernel(pg_ptr, pu_ptr, w_ptr, wd_ptr, partial_ptr, N: tl.constexpr, D: tl.constexpr, n: tl.constexpr,
                     b: tl.constexpr, KC: tl.constexpr, N_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        # one program per (tile of outputs, block): block i's share of the outputs, zero if
        # no token switched it on (then neither its partial sums nor its rows of W_d are read)
        pid, i = tl.program_id(0), tl.program_id(1)
        tokens = tl.arange(0, N_PAD)
        token_ok = tokens < N
        dcols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
        weight = tl.load(w_ptr + tokens * n + i, mask=token_ok, other=0.0)
        on = weight != 0
        if tl.sum(on.to(tl.int32), axis=0) > 0:
            for f0 in range(0, b, BLOCK_F):
                fs = i * b + f0 + tl.arange(0, BLOCK_F)
                g = tl.zeros((N_PAD, BLOCK_F), dtype=tl.float32)
                up = tl.zeros((N_PAD, BLOCK_F), dtype=tl.float32)
                for kc in range(KC):  # the partial sums in a fixed order
                    rows = (kc * N + tokens[:, None]) * (n * b) + fs[None, :]
                    g += tl.load(pg_ptr + rows, mask=on[:, None], other=0.0)
                    up += tl.load(pu_ptr + rows, mask=on[:, None], other=0.0)
                hid = tl.where(on[:, None], g * tl.sigmoid(g) * up * weight[:, None], 0.0)
                wd = tl.load(wd_ptr + dcols[:, None] * (n * b) + fs[None, :]).to(tl.float32)
                acc += tl.sum(hid[:, None, :] * wd[None, :, :], axis=2)
        tl.store(partial_ptr + (i * N + tokens[:, None]) * D + dcols[None, :], acc, mask=token_ok[:, None])


def dsmoe_decode(u_ND: Tensor, gate_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *,
                 threshold: float, rescale: bool) -> tuple[Tensor, Tensor]:
    """``(update (N, D) in u's dtype, G (N, n) float32)`` for ``u_ND`` (normalised inputs).
    ``gate_weight``: Y as ``(n, D)``; ``w_gate``/``w_up``: ``(F, D)``; ``w_down``: ``(D, F)``
    (``nn.Linear`` layouts)."""
    N, D = u_ND.shape
    n, F = gate_weight.shape[0], w_gate.shape[0]
    block_k = math.gcd(D, _BLOCK_K)  # a power of two dividing D (D is a multiple of BLOCK_D)
    KC = D // block_k
    u_ND = u_ND.contiguous()
    f32 = dict(dtype=torch.float32, device=u_ND.device)
    gates, weights = torch.empty(N, n, **f32), torch.empty(N, n, **f32)
    partial_gate, partial_up = torch.empty(KC, N, F, **f32), torch.empty(KC, N, F, **f32)
    partial = torch.empty(n, N, D, **f32)
    sizes = dict(N=N, D=D, n=n, N_PAD=max(2, triton.next_power_of_2(N)))
    _gates_kernel[(1,)](u_ND, gate_weight.contiguous(), threshold, gates, weights, RESCALE=rescale,
                        n_PAD=max(2, triton.next_power_of_2(n)), BLOCK_K=block_k, num_warps=_NUM_WARPS, **sizes)
    _up_kernel[(F // _BLOCK_F, KC)](u_ND, weights, w_gate.contiguous(), w_up.contiguous(), partial_gate, partial_up,
                                    b=F // n, BLOCK_F=_BLOCK_F, BLOCK_K=block_k, num_warps=_NUM_WARPS, **sizes)
    _down_kernel[(D // _BLOCK_D, n)](partial_gate, partial_up, weights, w_down.contiguous(), partial, b=F // n, KC=KC,
                                     BLOCK_F=_BLOCK_F, BLOCK_D=_BLOCK_D, num_warps=_NUM_WARPS, **sizes)
    return partial.sum(0).to(u_ND.dtype), gates
