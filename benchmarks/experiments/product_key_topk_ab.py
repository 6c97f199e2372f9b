"""Experiment: product-key retrieval's forward at issue 12's size (16,384 tokens × 8
heads = 131,072 queries, key width 256, 1024 sub-keys per table, k = 16; other sizes by
option, e.g. s120m-peer's: --tokens 32768 --sub-keys 512 --key-width 128), in one process:
the eager path, the fused path at several tile settings (rows and warps per program,
column groups of ``top_k_by_groups``), and the pieces apart — the
float32 score product (cuBLAS), ``torch.topk`` vs ``torch.sort`` over its rows, and the
kernel's k rounds of max-and-mask alone on precomputed scores.

    python benchmarks/experiments/product_key_topk_ab.py [--k 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import time_ms  # noqa: E402

from finemoe.kernels import product_keys  # noqa: E402
from finemoe.kernels.product_keys import fused_product_key_topk  # noqa: E402
from finemoe.kernels.topk import top_k_rounds  # noqa: E402
from finemoe.layers.routing import product_key_topk  # noqa: E402


@triton.jit
def _rounds_only_kernel(s_ptr, out_ptr, M, S: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, S)
    scores = tl.load(s_ptr + rows[:, None] * S + cols[None, :], mask=(rows < M)[:, None], other=0.0)
    values, where = top_k_rounds(scores, cols, K, KP)
    kcols = tl.arange(0, KP)
    tl.store(out_ptr + rows[:, None] * K + kcols[None, :], values + where.to(tl.float32) * 0,
             mask=(rows < M)[:, None] & (kcols[None, :] < K))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sub-keys", type=int, default=1024)
    parser.add_argument("--key-width", type=int, default=256)
    args = parser.parse_args()
    k, M, S, Q = args.k, args.tokens * 8, args.sub_keys, args.key_width
    print(f"{args.tokens} tokens x 8 heads, {S} sub-keys per table, key width {Q}, k = {k}")
    torch.manual_seed(0)
    q = torch.randn(args.tokens, 8, Q, device="cuda")
    keys = torch.randn(2, S, Q // 2, device="cuda")
    rows = {"eager (2 GEMMs, 3 topk)": lambda: product_key_topk(q, keys[0], keys[1], k)}
    for groups in (16, 32, 64):
        for rows_per_program, warps in ((1, 1), (2, 1), (4, 1), (4, 2), (8, 4)):
            def fused(r=rows_per_program, w=warps, g=groups):
                product_keys._TOPK_ROWS, product_keys._TOPK_WARPS, product_keys._TOPK_GROUPS = r, w, g
                fused_product_key_topk(q, keys[0], keys[1], k)
            rows[f"fused (cuBLAS scores + kernel), {groups} groups, {rows_per_program} rows, {warps} warps"] = fused
    scores = q[..., :Q // 2].reshape(M, Q // 2) @ keys[0].t()
    rows["one score GEMM (M, S) fp32"] = lambda: q[..., :Q // 2].reshape(M, Q // 2) @ keys[0].t()
    rows["torch.topk over (M, S)"] = lambda: scores.topk(k, dim=-1)
    rows["torch.sort over (M, S)"] = lambda: scores.sort(dim=-1, descending=True)
    out = torch.empty(M, k, device="cuda")
    for rows_per_program, warps in ((1, 1), (4, 1), (4, 2), (4, 4), (8, 4)):
        rows[f"rounds only, {rows_per_program} rows, {warps} warps"] = (
            lambda r=rows_per_program, w=warps: _rounds_only_kernel[(triton.cdiv(M, r),)](
                scores, out, M, S=S, K=k, KP=triton.next_power_of_2(k), ROWS=r, num_warps=w))
    for label, fn in rows.items():
        ms = time_ms(fn, "cuda", 2, 5)[0]
        print(f"  {label:60s} {ms:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
