"""SwiGLU hidden units of an expert bank with the token gather inside the GEMM (inference).

For rows grouped by expert (group e: ``counts[e]`` rows, groups in expert order, the
group sizes on the device) where row p is token ``token[p]`` scaled by ``scale[p]``:

    hidden[p] = silu(x[token[p]] W_g,e) ⊙ (x[token[p]] W_u,e) · scale[p]

One Triton kernel computes it (ScatterMoE's design): each program takes a tile of one
group's rows and a tile of the expert's hidden units, loads the tokens' rows of ``x``
through the index (no gathered copy of ``x`` is written), runs the gate and up
products side by side in float32 and writes only ``hidden`` in the compute dtype (no
``(rows, 2F)`` pre-activation buffer, no separate SwiGLU pass). Programs find their
group from the counts on the device, so nothing synchronises with the host; programs
past the last group's rows exit at once, so the work follows the rows that exist, not
the buffer's size. Rows past the last group are left unwritten.

DSMoE's sparse inference uses it: its blocks are the experts, the (token, block) pairs
switched on are the rows (``finemoe.layers.dsmoe``). Forward only; the reference is a
gather followed by ``finemoe.layers.experts.run_swiglu_experts``. Tested on the CPU
under ``TRITON_INTERPRET=1``.

Shapes: N tokens, D model width, E experts of F hidden units, S rows (≥ Σ counts).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["gathered_swiglu", "gathered_swiglu_applies"]

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tiles measured on an H100 (benchmarks/NOTES.md); small ones under the CPU interpreter.
_BLOCK_M, _BLOCK_N, _BLOCK_K, _WARPS, _STAGES = (16, 16, 16, 4, 1) if _INTERPRETED else (128, 128, 64, 8, 3)


def gathered_swiglu_applies(device: torch.device, dtype: torch.dtype, width: int, hidden: int) -> bool:
    """An ``x`` of ``width`` columns on a GPU (or under the interpreter) in half precision
    (float32 would run as TF32 in ``tl.dot``), and widths the tiles divide."""
    return (triton is not None and (device.type == "cuda" or _INTERPRETED) and dtype in (torch.bfloat16, torch.float16)
            and width % _BLOCK_K == 0 and hidden % _BLOCK_N == 0)


if triton is not None:

    @triton.jit
    def _gathered_swiglu_kernel(x_ptr, token_ptr, scale_ptr, counts_ptr, wg_ptr, wu_ptr, h_ptr,
                                stride_we, stride_wk, stride_wf,
                                E: tl.constexpr, E_PAD: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # The column tiles of one row tile are neighbouring programs: its gathered rows of
        # x are read from memory once and then from L2.
        pid = tl.program_id(0)
        col_tiles: tl.constexpr = F // BLOCK_N
        tile_m = pid // col_tiles
        tile_n = pid % col_tiles
        # which group this row tile belongs to: group e owns ceil(counts[e] / BLOCK_M) tiles
        groups = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + groups, mask=groups < E, other=0).to(tl.int32)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        e = tl.sum((tl.cumsum(tiles, 0) <= tile_m).to(tl.int32), 0)
        if e >= E:  # past the last group's rows
            return
        before = groups < e
        local = (tile_m - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = local < tl.sum(tl.where(groups == e, counts, 0), 0)
        rows = (tl.sum(tl.where(before, counts, 0), 0) + local).to(tl.int64)
        tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * D + ks[None, :]
        w_offsets = e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wf
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, D, BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            acc_gate = tl.dot(x, tl.load(wg_ptr + w_offsets), acc_gate)
            acc_up = tl.dot(x, tl.load(wu_ptr + w_offsets), acc_up)
            x_ptrs += BLOCK_K
            w_offsets += BLOCK_K * stride_wk
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up * scale[:, None]
        tl.store(h_ptr + rows[:, None] * F + cols[None, :], hidden.to(h_ptr.dtype.element_ty), mask=row_ok[:, None])


@kernel_op("finemoe::gathered_swiglu", mutates_args=())
def _gathered_swiglu(x_ND: Tensor, token_S: Tensor, scale_S: Tensor, counts_E: Tensor, w_gate_EDF: Tensor,
                     w_up_EDF: Tensor) -> Tensor:
    x_ND = x_ND.contiguous()
    S, (E, D, F) = token_S.shape[0], w_gate_EDF.shape
    hidden_SF = x_ND.new_empty(S, F)
    if S == 0:
        return hidden_SF
    # enough row tiles for any split of S rows into E groups
    grid = ((triton.cdiv(S, _BLOCK_M) + E) * (F // _BLOCK_N),)
    launch(_gathered_swiglu_kernel)[grid](
        x_ND, token_S, scale_S, counts_E, w_gate_EDF, w_up_EDF, hidden_SF, *w_gate_EDF.stride(),
        E=E, E_PAD=triton.next_power_of_2(E), D=D, F=F, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        num_warps=_WARPS, num_stages=_STAGES)
    return hidden_SF


@fake(_gathered_swiglu)
def _(x_ND, token_S, scale_S, counts_E, w_gate_EDF, w_up_EDF) -> Tensor:
    return x_ND.new_empty(token_S.shape[0], w_gate_EDF.shape[-1])


def gathered_swiglu(x_ND: Tensor, token_S: Tensor, scale_S: Tensor, counts_E: Tensor, w_gate_EDF: Tensor,
                    w_up_EDF: Tensor) -> Tensor:
    """``hidden[p] = silu(x[token[p]] W_g,e) ⊙ (x[token[p]] W_u,e) · scale[p]`` for the
    rows of group e (``counts_E`` on the device; rows past ``Σ counts`` unwritten),
    ``(S, F)`` in ``x``'s dtype. Weights ``(E, D, F)``, any strides (views of a dense
    FFN's weights do); ``w_gate`` and ``w_up`` have the same strides."""
    if not gathered_swiglu_applies(x_ND.device, x_ND.dtype, x_ND.shape[1], w_gate_EDF.shape[-1]):
        raise ValueError(f"gathered_swiglu takes a half-precision x on a GPU with D a multiple of {_BLOCK_K} and F of "
                         f"{_BLOCK_N}; got {x_ND.dtype} on {x_ND.device}, D = {x_ND.shape[1]}, F = {w_gate_EDF.shape[-1]}")
    if w_gate_EDF.stride() != w_up_EDF.stride():
        w_gate_EDF, w_up_EDF = w_gate_EDF.contiguous(), w_up_EDF.contiguous()
    dtype = x_ND.dtype
    return _gathered_swiglu(x_ND, token_S, scale_S.float(), counts_E, w_gate_EDF.to(dtype), w_up_EDF.to(dtype))
