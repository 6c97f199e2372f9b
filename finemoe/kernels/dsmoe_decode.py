"""DSMoE inference for a few tokens (decoding): only the weights of switched-on blocks are read.

Decoding is bound by reading weights, and a dense FFN reads all of them (under autocast
it first copies them to bf16). DSMoE's claim is that inactive blocks cost nothing, so
two Triton kernels, with no host sync (a CUDA graph can capture them), read each
block's weights only if some token of the batch switched the block on:

1. ``up``: one program per tile of ``BLOCK_F`` hidden units. It computes every token's
   gates itself (``a = sigmoid(u Y)``, ``G(a) = a·[a > τ]``, the rescaling
   ``n / #active``: a D × n product, from L2), writes ``G`` (program 0), and if a token
   switched its block on, the tile's ``silu(u W_g) ⊙ (u W_u) · G·scale``.
2. ``down``: one program per (tile of ``BLOCK_D`` outputs, block): if some token
   switched the block on, ``hidden_block W_d,block``, else zero; the n partial sums are
   then added in a fixed order. Blocks no token uses are never read. (One program per
   tile of outputs looping over the blocks left 16 programs for d = 1024: replayed as
   a CUDA graph the layer took 135 µs against the dense FFN's 55.)

Float32 accumulation throughout; the weights are read in their own dtype. The layer's
``sparse_forward`` (tokens grouped by block, grouped GEMMs) is the reference; tests run
these kernels on the CPU under ``TRITON_INTERPRET=1``.

Shapes: N tokens (≤ MAX_TOKENS), D model width, F = n·b FFN width, n blocks of b.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["MAX_TOKENS", "dsmoe_decode", "dsmoe_decode_applies"]

MAX_TOKENS = 16
_BLOCK_F, _BLOCK_D = 32, 64
_NUM_WARPS = 4


def dsmoe_decode_applies(u_ND: Tensor, block_width: int) -> bool:
    """Few tokens, and widths the tiles divide."""
    return (triton is not None and u_ND.shape[0] <= MAX_TOKENS and block_width % _BLOCK_F == 0
            and u_ND.shape[1] % _BLOCK_D == 0)


if triton is not None:

    @triton.jit
    def _up_kernel(u_ptr, y_ptr, wg_ptr, wu_ptr, tau, g_out_ptr, hidden_ptr,
                   N: tl.constexpr, D: tl.constexpr, n: tl.constexpr, b: tl.constexpr, RESCALE: tl.constexpr,
                   N_PAD: tl.constexpr, n_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        f0 = pid * BLOCK_F
        blk = f0 // b
        tokens = tl.arange(0, N_PAD)
        blocks = tl.arange(0, n_PAD)
        token_ok = tokens < N
        # gates of every token for every block: logits = u Y
        logits = tl.zeros((N_PAD, n_PAD), dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            u = tl.load(u_ptr + tokens[:, None] * D + ds[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
            y = tl.load(y_ptr + blocks[None, :] * D + ds[:, None], mask=(blocks < n)[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(u[:, :, None] * y[None, :, :], axis=1)
        a = tl.sigmoid(logits)
        on = (a > tau) & token_ok[:, None] & (blocks < n)[None, :]
        gates = tl.where(on, a, 0.0)
        if pid == 0:
            tl.store(g_out_ptr + tokens[:, None] * n + blocks[None, :], gates, mask=token_ok[:, None] & (blocks < n)[None, :])
        scale = tl.full((N_PAD,), 1.0, tl.float32)
        if RESCALE:
            count = tl.sum(on.to(tl.float32), axis=1)
            scale = tl.where(count > 0, n / tl.maximum(count, 1.0), 0.0)
        weight = tl.sum(tl.where(blocks[None, :] == blk, gates, 0.0), axis=1) * scale  # (N_PAD,)
        if tl.sum((weight != 0).to(tl.int32), axis=0) > 0:
            fs = f0 + tl.arange(0, BLOCK_F)
            acc_g = tl.zeros((N_PAD, BLOCK_F), dtype=tl.float32)
            acc_u = tl.zeros((N_PAD, BLOCK_F), dtype=tl.float32)
            for d0 in tl.static_range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                u = tl.load(u_ptr + tokens[:, None] * D + ds[None, :], mask=token_ok[:, None], other=0.0).to(tl.float32)
                wg = tl.load(wg_ptr + fs[:, None] * D + ds[None, :]).to(tl.float32)
                wu = tl.load(wu_ptr + fs[:, None] * D + ds[None, :]).to(tl.float32)
                acc_g += tl.sum(u[:, None, :] * wg[None, :, :], axis=2)
                acc_u += tl.sum(u[:, None, :] * wu[None, :, :], axis=2)
            hidden = acc_g * tl.sigmoid(acc_g) * acc_u * weight[:, None]
            tl.store(hidden_ptr + tokens[:, None] * (n * b) + fs[None, :], hidden, mask=token_ok[:, None])

    @triton.jit
    def _down_kernel(hidden_ptr, g_ptr, wd_ptr, partial_ptr, N: tl.constexpr, D: tl.constexpr, n: tl.constexpr,
                     b: tl.constexpr, N_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per (tile of outputs, block): block i's share of the outputs, zero if
        # no token switched it on (then its rows of W_d are not read)
        pid, i = tl.program_id(0), tl.program_id(1)
        tokens = tl.arange(0, N_PAD)
        token_ok = tokens < N
        dcols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((N_PAD, BLOCK_D), dtype=tl.float32)
        on = tl.load(g_ptr + tokens * n + i, mask=token_ok, other=0.0) > 0
        if tl.sum(on.to(tl.int32), axis=0) > 0:
            for f0 in tl.static_range(0, b, BLOCK_F):
                fs = i * b + f0 + tl.arange(0, BLOCK_F)
                hid = tl.load(hidden_ptr + tokens[:, None] * (n * b) + fs[None, :], mask=on[:, None], other=0.0)
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
    u_ND = u_ND.contiguous()
    gates = torch.empty(N, n, dtype=torch.float32, device=u_ND.device)
    hidden = torch.empty(N, F, dtype=torch.float32, device=u_ND.device)
    partial = torch.empty(n, N, D, dtype=torch.float32, device=u_ND.device)
    sizes = dict(N=N, D=D, n=n, b=F // n, N_PAD=max(2, triton.next_power_of_2(N)), BLOCK_F=_BLOCK_F, BLOCK_D=_BLOCK_D)
    _up_kernel[(F // _BLOCK_F,)](u_ND, gate_weight.contiguous(), w_gate.contiguous(), w_up.contiguous(), threshold, gates,
                                 hidden, RESCALE=rescale, n_PAD=max(2, triton.next_power_of_2(n)), num_warps=_NUM_WARPS,
                                 **sizes)
    _down_kernel[(D // _BLOCK_D, n)](hidden, gates, w_down.contiguous(), partial, num_warps=_NUM_WARPS, **sizes)
    return partial.sum(0).to(u_ND.dtype), gates
