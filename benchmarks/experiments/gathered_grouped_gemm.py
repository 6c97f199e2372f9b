"""Experiment: can a Triton grouped GEMM with the slot gather inside run at CUTLASS's rate?

The one lever left for moe E = 8 / E = 64 (benchmarks/NOTES.md, "Next for moe E = 8 /
E = 64") is ScatterMoE's structure: the tokens' rows gathered in the GEMM's A-tile
loads, the weight gradient written in float32 by the GEMM. It pays only if the Triton
GEMM runs about as fast as torch's CUTLASS grouped GEMM (``torch._grouped_mm``) it
replaces: moe E = 8's grouped products take 1.73 ms a step, so 10% slower GEMMs cost
more than the gather, the per-token sum and the casts together save at E = 8.

This times, at the layer benchmark's shapes (16,384 tokens, d = 1024; E = 8, k = 2,
width 2,048; E = 64, k = 8, width 512; uniformly random routing):

- forward gate/up: ``index_select`` + ``torch._grouped_mm`` against one Triton kernel
  that gathers the rows itself (and the same kernel on pre-gathered rows);
- forward down and the input gradient of gate/up (contiguous rows, transposed weights);
- the weight gradient of gate/up: ``torch._grouped_mm(xᵀ, dy)`` in bf16 + the cast to
  float32 against a Triton kernel contracting each group's gathered rows into float32.

Each Triton kernel runs in a few tile configurations (non-persistent: one program per
output tile, its group found from the counts on the device, as in
``finemoe.kernels.gathered_swiglu``; persistent: one program per SM walking the tiles).
GPU time: CUDA events, median of 30. Checks each result against the torch path.

    python benchmarks/experiments/gathered_grouped_gemm.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import median_ms

timed = partial(median_ms, warmup=5, repeats=30)


@triton.jit
def _group_of_tile(counts_ptr, tile_m, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Group e of row tile ``tile_m`` (E if past the last group), the tile's rows and their mask."""
    groups = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + groups, mask=groups < E, other=0).to(tl.int32)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(tiles, 0) <= tile_m).to(tl.int32), 0)
    before = groups < e
    local = (tile_m - tl.sum(tl.where(before, tiles, 0), 0)) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < tl.sum(tl.where(groups == e, counts, 0), 0)
    rows = (tl.sum(tl.where(before, counts, 0), 0) + local).to(tl.int64)
    return e, rows, row_ok


@triton.jit
def _grouped_gemm_kernel(a_ptr, index_ptr, counts_ptr, b_ptr, c_ptr, stride_be, stride_bk, stride_bn,
                         NUM_TILES, E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                         GATHER: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """``c[r] = a[index[r] if GATHER else r] @ b[group of r]``; column tiles of one row tile
    are neighbouring tiles (the A rows are read once from memory, then from L2)."""
    col_tiles: tl.constexpr = N // BLOCK_N
    start = tl.program_id(0)
    step = tl.num_programs(0) if PERSISTENT else NUM_TILES
    for tile in range(start, NUM_TILES, step):
        tile_m = tile // col_tiles
        tile_n = tile % col_tiles
        e, rows, row_ok = _group_of_tile(counts_ptr, tile_m, E, E_PAD, BLOCK_M)
        if e < E:
            if GATHER:
                a_rows = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            else:
                a_rows = rows
            cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + a_rows[:, None] * K + ks[None, :]
            b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                acc = tl.dot(tl.load(a_ptrs, mask=row_ok[:, None], other=0.0), tl.load(b_ptrs), acc)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * stride_bk
            tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _grouped_weight_grad_kernel(a_ptr, index_ptr, counts_ptr, g_ptr, w_ptr, E: tl.constexpr, E_PAD: tl.constexpr,
                                K: tl.constexpr, N: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """``w[e] = Σ_{r in group e} a[index[r]]ᵀ g[r]`` in float32, ``(E, K, N)``."""
    e = tl.program_id(0)
    tile_k = tl.program_id(1)
    tile_n = tl.program_id(2)
    groups = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + groups, mask=groups < E, other=0).to(tl.int32)
    first = tl.sum(tl.where(groups < e, counts, 0), 0)
    count = tl.sum(tl.where(groups == e, counts, 0), 0)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m in tl.range(0, count, BLOCK_M, num_stages=STAGES):
        local = m + tl.arange(0, BLOCK_M)
        ok = local < count
        rows = (first + local).to(tl.int64)
        if GATHER:
            a_rows = tl.load(index_ptr + rows, mask=ok, other=0).to(tl.int64)
        else:
            a_rows = rows
        a_t = tl.load(a_ptr + a_rows[None, :] * K + ks[:, None], mask=ok[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None], other=0.0)
        acc = tl.dot(a_t, g, acc)
    tl.store(w_ptr + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :], acc)


def grouped_gemm(a, index, counts, b, config, persistent=False):
    """Rows of ``a`` (gathered by ``index`` if given) times ``b[e]`` of their group, bf16 out."""
    block_m, block_n, block_k, warps, stages = config
    E, K, N = b.shape
    S = index.shape[0] if index is not None else a.shape[0]
    c = a.new_empty(S, N)
    num_tiles = (triton.cdiv(S, block_m) + E) * (N // block_n)
    grid = (min(num_tiles, torch.cuda.get_device_properties(0).multi_processor_count),) if persistent else (num_tiles,)
    _grouped_gemm_kernel[grid](a, index if index is not None else counts, counts, b, c, *b.stride(), num_tiles, E=E,
                               E_PAD=triton.next_power_of_2(E), K=K, N=N, GATHER=index is not None,
                               PERSISTENT=persistent, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               STAGES=stages, num_warps=warps)
    return c


def grouped_weight_grad(a, index, counts, g, config):
    """``(E, K, N)`` float32 weight gradient of the grouped product."""
    block_m, block_n, block_k, warps, stages = config
    E, K, N = counts.shape[0], a.shape[1], g.shape[1]
    w = torch.empty(E, K, N, device=a.device, dtype=torch.float32)
    _grouped_weight_grad_kernel[(E, K // block_k, N // block_n)](
        a, index if index is not None else counts, counts, g, w, E=E, E_PAD=triton.next_power_of_2(E), K=K, N=N,
        GATHER=index is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return w


GEMM_CONFIGS = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
GRAD_CONFIGS = [(64, 128, 128, 4, 3), (64, 128, 128, 8, 3), (64, 256, 128, 8, 3), (32, 128, 128, 4, 4),
                (64, 128, 64, 4, 4)]


def _relerr(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _routing(tokens, E, k, device):
    g = torch.Generator(device=device).manual_seed(0)
    idx = torch.rand(tokens, E, device=device, generator=g).topk(k, dim=1).indices
    sorted_ids, order = idx.reshape(-1).sort(stable=True)
    counts = torch.bincount(sorted_ids, minlength=E)
    return (order // k).contiguous(), counts, torch.cumsum(counts, 0, dtype=torch.int32)


def _report(label, flops, ref_ms, runs):
    print(f"\n{label}: torch {ref_ms:.3f} ms ({flops / ref_ms / 1e9:.0f} TFLOP/s)")
    print("| variant | config (BM, BN, BK, warps, stages) | ms | TFLOP/s | vs torch | rel. error |")
    print("|---|---|---:|---:|---:|---:|")
    for name, config, ms, err in runs:
        print(f"| {name} | {config} | {ms:.3f} | {flops / ms / 1e9:.0f} | {ref_ms / ms:.2f} | {err:.1e} |")
    sys.stdout.flush()


def _forward_shapes(tokens, d, E, k, width, device):
    token_S, counts, offs = _routing(tokens, E, k, device)
    S = token_S.shape[0]
    new = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.05
    x, w_gu, h, w_d, dy_gu = new(tokens, d), new(E, d, 2 * width), new(S, width), new(E, width, d), new(S, 2 * width)
    label = f"E = {E}, k = {k}, width {width}, {S} rows"

    # forward gate/up, gather included
    flops = 2 * S * d * 2 * width
    ref = torch._grouped_mm(x.index_select(0, token_S), w_gu, offs=offs)
    ref_ms = timed(lambda: torch._grouped_mm(x.index_select(0, token_S), w_gu, offs=offs))
    runs = []
    for config in GEMM_CONFIGS:
        for persistent in (False, True):
            out = grouped_gemm(x, token_S, counts, w_gu, config, persistent)
            runs.append((f"gathered{' persistent' if persistent else ''}", config,
                         timed(lambda c=config, p=persistent: grouped_gemm(x, token_S, counts, w_gu, c, p)), _relerr(out, ref)))
    _report(f"forward gate/up with the gather, {label}", flops, ref_ms, runs)

    xg = x.index_select(0, token_S)
    ref_ms = timed(lambda: torch._grouped_mm(xg, w_gu, offs=offs))
    runs = [("contiguous", c, timed(lambda c=c: grouped_gemm(xg, None, counts, w_gu, c)),
             _relerr(grouped_gemm(xg, None, counts, w_gu, c), ref)) for c in GEMM_CONFIGS]
    _report(f"forward gate/up, rows already gathered, {label}", flops, ref_ms, runs)

    # forward down
    flops = 2 * S * width * d
    ref = torch._grouped_mm(h, w_d, offs=offs)
    ref_ms = timed(lambda: torch._grouped_mm(h, w_d, offs=offs))
    runs = [("contiguous", c, timed(lambda c=c: grouped_gemm(h, None, counts, w_d, c)),
             _relerr(grouped_gemm(h, None, counts, w_d, c), ref)) for c in GEMM_CONFIGS]
    _report(f"forward down, {label}", flops, ref_ms, runs)

    # input gradient of gate/up: dy (S, 2F) @ w_guᵀ (E, 2F, d)
    flops = 2 * S * 2 * width * d
    w_t = w_gu.transpose(1, 2)
    ref = torch._grouped_mm(dy_gu, w_t, offs=offs)
    ref_ms = timed(lambda: torch._grouped_mm(dy_gu, w_t, offs=offs))
    runs = [("contiguous, transposed weights", c, timed(lambda c=c: grouped_gemm(dy_gu, None, counts, w_t, c)),
             _relerr(grouped_gemm(dy_gu, None, counts, w_t, c), ref)) for c in GEMM_CONFIGS]
    _report(f"input gradient of gate/up, {label}", flops, ref_ms, runs)

    # weight gradient of gate/up, float32 out
    flops = 2 * S * d * 2 * width
    ref = torch._grouped_mm(xg.t(), dy_gu, offs=offs).float()
    ref_ms = timed(lambda: torch._grouped_mm(xg.t(), dy_gu, offs=offs).float())
    runs = []
    for c in GRAD_CONFIGS:
        runs.append(("gathered, float32 out", c, timed(lambda c=c: grouped_weight_grad(x, token_S, counts, dy_gu, c)),
                     _relerr(grouped_weight_grad(x, token_S, counts, dy_gu, c), ref)))
        runs.append(("contiguous, float32 out", c, timed(lambda c=c: grouped_weight_grad(xg, None, counts, dy_gu, c)),
                     _relerr(grouped_weight_grad(xg, None, counts, dy_gu, c), ref)))
    _report(f"weight gradient of gate/up (torch: bf16 + cast to float32), {label}", flops, ref_ms, runs)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tokens, d, F_ = 16384, 1024, 4096
    _forward_shapes(tokens, d, 8, 2, F_ // 2, "cuda")
    _forward_shapes(tokens, d, 64, 8, F_ // 8, "cuda")


if __name__ == "__main__":
    main()
