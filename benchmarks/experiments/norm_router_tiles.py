"""Tiles of the norm-and-router kernels (``finemoe.kernels.norm_router``), each pass timed
alone at moe E = 8's shape (16,384 tokens, d = 1024, 10 router columns: SMoE-Share's
router and mixing gate), by GPU time (the kernels' own times under the profiler; a
call's wall time here is its host launch), against the byte floor of what it moves.

    python benchmarks/experiments/norm_router_tiles.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from profile_layer import gpu_ms  # noqa: E402

import finemoe.kernels.norm_router as nr  # noqa: E402


def main() -> None:
    N, D, C = 16384, 1024, 10
    torch.manual_seed(0)
    h = torch.randn(N, D, device="cuda")
    w = torch.rand(D, device="cuda")
    W = torch.randn(C, D, device="cuda") * 0.02
    dx = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    dl = torch.randn(N, C, device="cuda")
    forward = lambda: nr._norm_and_router(h, w, W, None, 1e-5, torch.bfloat16)  # noqa: E731
    backward = lambda: nr._norm_and_router_backward(h, w, W, dx, dl, 1e-5)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}; floors at 3 TB/s: forward 32 µs (96 MB), backward 85 µs (256 MB)")
    for rows, warps in itertools.product([1, 2, 4, 8, 16], [1, 2, 4, 8]):
        nr._FORWARD_ROWS, nr._FORWARD_WARPS = rows, warps
        print(f"forward rows {rows:2d} warps {warps}: {gpu_ms(forward) * 1e3:7.1f} µs", flush=True)
    nr._FORWARD_ROWS, nr._FORWARD_WARPS = 8, 4
    nr._GRAD_ROWS, nr._GRAD_COLS, nr._GRAD_GROUPS, nr._GRAD_WARPS = 16, 128, 64, 4
    for rows, cols, warps in itertools.product([8, 16, 32], [128, 256, 512], [2, 4, 8]):
        nr._STAT_ROWS, nr._STAT_COLS, nr._STAT_WARPS = rows, cols, warps
        print(f"backward, stats rows {rows:2d} cols {cols:3d} warps {warps}: {gpu_ms(backward) * 1e3:7.1f} µs",
              flush=True)
    nr._STAT_ROWS, nr._STAT_COLS, nr._STAT_WARPS = 16, 256, 4
    for rows, cols, groups, warps in itertools.product([16, 32], [64, 128, 256], [32, 64, 128, 256], [4, 8]):
        nr._GRAD_ROWS, nr._GRAD_COLS, nr._GRAD_GROUPS, nr._GRAD_WARPS = rows, cols, groups, warps
        print(f"backward, grads rows {rows:2d} cols {cols:3d} groups {groups:3d} warps {warps}: "
              f"{gpu_ms(backward) * 1e3:7.1f} µs", flush=True)


if __name__ == "__main__":
    main()
