"""DSMoE inference for a batch of tokens: the gates, and the layout of the switched-on pairs.

``norm_and_gates``: RMSNorm, the cast of the normed input to the compute dtype and the
thresholded sigmoid gates in one pass over the input (one kernel where PyTorch runs a
norm, a cast and a float32 GEMM of width n = 8, together 130 µs for 16,384 tokens on an
H100).

``block_pairs``: the layout of the switched-on (token, block) pairs.

The sparse path runs the blocks as an expert bank on the pairs switched on, grouped by
block (``finemoe.layers.dsmoe``). Laying them out in PyTorch takes some fifteen small
kernels (cumulative sums, scatters, the rescaling), each a launch whose host cost is
comparable to its GPU time. This kernel does it in one launch, from the thresholded
gates ``G`` (a pair is on where ``G > 0``):

- ``counts[i]``, ``ends[i]``: pairs per block and their cumulative sum (int32), the
  group sizes of the expert bank;
- for the j-th pair of block i in token order, row ``ends[i-1] + j`` of the bank gets
  ``token`` and ``scale = G · n / #active`` (the dropout-like rescaling, if on);
- ``position[t, i]``: the row of pair (t, i), -1 where it is off.

Two kernels over tiles of tokens: the pairs per block in each tile, then each tile's
rows (after the pairs of the tiles before it). A first version walked all tokens in one
program: 167 µs for 16,384 tokens × 8 blocks on an H100, more than half the main GEMM. The layout is the same as the layer's PyTorch
one (``_active_pairs_first``); rows past the active pairs are left unwritten. Tested on
the CPU under ``TRITON_INTERPRET=1``.

Shapes: N tokens, n blocks, S = n·N rows.
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

__all__ = ["block_pairs", "norm_and_gates"]

_BLOCK_TOKENS = 128
NORM_TILE = {"ROWS": 8, "num_warps": 4}
"""Rows per program of the norm-and-gates kernel, and its warps (module-level so that
benchmarks/experiments/dsmoe_norm_gates_tiles.py can sweep them)."""


if triton is not None:

    @triton.jit
    def _tile_counts_kernel(g_ptr, tile_counts_ptr, N, n: tl.constexpr, n_PAD: tl.constexpr, BLOCK: tl.constexpr):
        tile = tl.program_id(0)
        blocks = tl.arange(0, n_PAD)
        tokens = tile * BLOCK + tl.arange(0, BLOCK)
        ok = (tokens < N)[:, None] & (blocks < n)[None, :]
        g = tl.load(g_ptr + tokens[:, None] * n + blocks[None, :], mask=ok, other=0.0)
        tl.store(tile_counts_ptr + tile * n + blocks, tl.sum((g > 0).to(tl.int32), 0), mask=blocks < n)

    @triton.jit
    def _block_pairs_kernel(g_ptr, tile_counts_ptr, token_ptr, scale_ptr, position_ptr, counts_ptr, ends_ptr, N,
                            TILES, n: tl.constexpr, n_PAD: tl.constexpr, RESCALE: tl.constexpr, BLOCK: tl.constexpr):
        tile = tl.program_id(0)
        blocks = tl.arange(0, n_PAD)
        block_ok = blocks < n
        # every block's pairs in all tiles and in the tiles before this one (a while loop:
        # Triton's CPU interpreter cannot run a for loop to a runtime bound)
        counts = tl.zeros((n_PAD,), dtype=tl.int32)
        before = tl.zeros((n_PAD,), dtype=tl.int32)
        t = 0
        while t < TILES:
            c = tl.load(tile_counts_ptr + t * n + blocks, mask=block_ok, other=0)
            counts += c
            before += tl.where(t < tile, c, 0)
            t += 1
        ends = tl.cumsum(counts, 0)
        if tile == 0:
            tl.store(counts_ptr + blocks, counts, mask=block_ok)
            tl.store(ends_ptr + blocks, ends, mask=block_ok)
        tokens = tile * BLOCK + tl.arange(0, BLOCK)
        ok = (tokens < N)[:, None] & block_ok[None, :]
        g = tl.load(g_ptr + tokens[:, None] * n + blocks[None, :], mask=ok, other=0.0)
        on = (g > 0).to(tl.int32)
        row = (ends - counts + before)[None, :] + tl.cumsum(on, 0) - on   # rank among the block's pairs
        if RESCALE:
            per_token = tl.sum(on, 1).to(tl.float32)
            g = g * (n / tl.maximum(per_token, 1.0))[:, None]
        tl.store(position_ptr + tokens[:, None] * n + blocks[None, :], tl.where(on > 0, row, -1), mask=ok)
        tl.store(token_ptr + row, tokens[:, None] + 0 * row, mask=ok & (on > 0))
        tl.store(scale_ptr + row, g, mask=ok & (on > 0))


    @triton.jit
    def _norm_gates_kernel(h_ptr, norm_ptr, y_ptr, x_ptr, g_ptr, N, eps, tau, D: tl.constexpr, D_PAD: tl.constexpr,
                           n: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, D_PAD)
        row_ok, col_ok = rows < N, cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        weight = tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        u = h * tl.rsqrt(tl.sum(h * h, 1) / D + eps)[:, None] * weight[None, :]
        tl.store(x_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], u.to(x_ptr.dtype.element_ty), mask=ok)
        for i in tl.static_range(n):  # a = sigmoid(u Y_i), G = a·[a > τ], in float32
            a = tl.sigmoid(tl.sum(u * tl.load(y_ptr + i * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :], 1))
            tl.store(g_ptr + rows * n + i, tl.where(a > tau, a, 0.0), mask=row_ok)


@kernel_op("finemoe::dsmoe_norm_and_gates", mutates_args=())
def _norm_and_gates(h_ND: Tensor, norm_weight: Tensor, gate_weight: Tensor, eps: float, threshold: float,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    h_ND, gate_weight = h_ND.contiguous(), gate_weight.contiguous()
    (N, D), n = h_ND.shape, gate_weight.shape[0]
    x_ND = torch.empty(N, D, dtype=dtype, device=h_ND.device)
    G_Nn = torch.empty(N, n, dtype=torch.float32, device=h_ND.device)
    if N:
        launch(_norm_gates_kernel)[(triton.cdiv(N, NORM_TILE["ROWS"]),)](
            h_ND, norm_weight, gate_weight, x_ND, G_Nn, N, eps, threshold, D=D, D_PAD=triton.next_power_of_2(D), n=n,
            ROWS=NORM_TILE["ROWS"], num_warps=NORM_TILE["num_warps"])
    return x_ND, G_Nn


@fake(_norm_and_gates)
def _(h_ND, norm_weight, gate_weight, eps, threshold, dtype):
    return h_ND.new_empty(h_ND.shape, dtype=dtype), h_ND.new_empty(h_ND.shape[0], gate_weight.shape[0],
                                                                   dtype=torch.float32)


def norm_and_gates(h_ND: Tensor, norm_weight: Tensor, gate_weight: Tensor, eps: float, threshold: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The layer's input side in one pass over ``h``: ``u = RMSNorm(h)`` (float32), ``u``
    in ``dtype`` for the experts, and the thresholded gates ``G = a·[a > τ]`` with
    ``a = sigmoid(u Y)`` (float32, ``(N, n)``). Replaces the norm, a cast and a float32
    GEMM of width n that cuBLAS runs at a few percent of its peak."""
    return _norm_and_gates(h_ND, norm_weight, gate_weight, float(eps), float(threshold), dtype)


@kernel_op("finemoe::dsmoe_block_pairs", mutates_args=())
def _block_pairs(G_Nn: Tensor, rescale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    G_Nn = G_Nn.contiguous()
    N, n = G_Nn.shape
    new = lambda *shape, dtype=torch.int32: torch.empty(*shape, dtype=dtype, device=G_Nn.device)  # noqa: E731
    token_S, scale_S, position_Nn, counts_n, ends_n = new(n * N), new(n * N, dtype=torch.float32), new(N, n), new(n), new(n)
    tiles = triton.cdiv(N, _BLOCK_TOKENS)
    if tiles == 0:
        return token_S, scale_S, position_Nn, counts_n.zero_(), ends_n.zero_()
    tile_counts = new(tiles, n)
    sizes = dict(n=n, n_PAD=triton.next_power_of_2(n), BLOCK=_BLOCK_TOKENS)
    launch(_tile_counts_kernel)[(tiles,)](G_Nn, tile_counts, N, **sizes)
    launch(_block_pairs_kernel)[(tiles,)](G_Nn, tile_counts, token_S, scale_S, position_Nn, counts_n, ends_n, N,
                                          tiles, RESCALE=rescale, **sizes)
    return token_S, scale_S, position_Nn, counts_n, ends_n


@fake(_block_pairs)
def _(G_Nn: Tensor, rescale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    N, n = G_Nn.shape
    new = lambda *shape, dtype=torch.int32: G_Nn.new_empty(*shape, dtype=dtype)  # noqa: E731
    return new(n * N), new(n * N, dtype=torch.float32), new(N, n), new(n), new(n)


def block_pairs(G_Nn: Tensor, rescale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(token_S, scale_S, position_Nn, counts_n, ends_n)`` of the pairs with ``G > 0``
    (see the module's docstring); ``G`` float32 ``(N, n)``."""
    return _block_pairs(G_Nn.float(), rescale)
