"""Experiment: the tiles of PEER's per-token passes (the expert forward kernel and the
per-token backward kernel: one program per token, its J retrieved rows read as
(J, BLOCK_D) tiles) on the retrievals of a real s120m-peer batch, where a few thousand
rows take nearly every retrieval and sit in L2, and on uniform ones, at s120m-peer's
shape (reading bf16 copies of the tables, as ``table_copies`` does there) and at issue
12's size (float32 tables). GPU time, median of 20; the backward includes the row pass,
which the tiles do not change.

    python benchmarks/experiments/peer_token_pass_tiles.py --data .data/prose
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layer_benchmark import median_ms  # noqa: E402
from peer_row_pass import _real_retrievals  # noqa: E402

from finemoe.kernels import peer_experts as kernels  # noqa: E402

TILES = ((32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8))


def _sweep(label: str, x, idx, gates, u, v, u_read, v_read) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    dy = (torch.randn(x.shape, device="cuda", generator=g) * 0.02).to(x.dtype)
    kept = kernels._BLOCK_D, kernels._NUM_WARPS
    print(f"\n{label}: {x.shape[0]:,} tokens, d = {x.shape[1]}, J = {idx.shape[1]}, "
          f"{int(idx.unique().numel()):,} of {u.shape[0]:,} rows retrieved, tables read in {u_read.dtype}")
    print("| BLOCK_D, warps | forward ms | backward ms (with the row pass) |\n|---|---:|---:|")
    ref = None
    for block_d, warps in TILES:
        kernels._BLOCK_D, kernels._NUM_WARPS = block_d, warps
        y, pre = kernels._peer_experts(x, idx, gates, u, v, u_read, v_read, "gelu")
        ref = ref if ref is not None else y.clone()
        fwd = median_ms(lambda: kernels._peer_experts(x, idx, gates, u, v, u_read, v_read, "gelu"), warmup=3,
                        repeats=20)
        bwd = median_ms(lambda pre=pre: kernels._peer_experts_backward(dy, x, idx, gates, pre, u, v, u_read, v_read,
                                                                       "gelu"),
                        warmup=3, repeats=20)
        mark = " (the library's)" if (block_d, warps) == kept else ""
        print(f"| {block_d}, {warps}{mark} | {fwd:.3f} | {bwd:.3f} |  max |y - first| {float((y - ref).abs().max()):.1e}",
              flush=True)
    kernels._BLOCK_D, kernels._NUM_WARPS = kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=".data/prose")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    x, idx, gates, layer = _real_retrievals(args.data, args.steps)
    u, v = layer.expert_in.detach(), layer.expert_out.detach()
    u16, v16 = u.to(x.dtype), v.to(x.dtype)
    _sweep(f"real retrievals of s120m-peer after {args.steps} steps", x, idx, gates, u, v, u16, v16)
    g = torch.Generator(device="cuda").manual_seed(0)
    uniform = torch.randint(0, u.shape[0], idx.shape, device="cuda", generator=g)
    _sweep("uniform retrievals, same shape", x, uniform, gates, u, v, u16, v16)
    del u16, v16, layer
    N, D, P, J = 16384, 1024, 1024**2, 128
    x = (torch.randn(N, D, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    u = torch.randn(P, D, device="cuda", generator=g) * 0.02
    v = torch.randn(P, D, device="cuda", generator=g) * 0.02
    idx = torch.randint(0, P, (N, J), device="cuda", generator=g)
    gates = torch.rand(N, J, device="cuda", generator=g)
    _sweep("uniform retrievals at issue 12's size", x, idx, gates, u, v, u, v)


if __name__ == "__main__":
    main()
