"""Experiment: tiles of DSMoE's norm-and-gates kernel (``finemoe.kernels.dsmoe_prefill``) at
the layer benchmark's size (16,384 tokens, d = 1024, n = 8): the kernel's GPU time per
call for each (rows per program, warps), then the prefill forward as a CUDA graph against
the dense forward's graph with the default tile and with the fastest, in one process.

    python benchmarks/experiments/dsmoe_norm_gates_tiles.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import cuda_graph_forward, median_ms
from profile_layer import gpu_ms

from finemoe.kernels import dsmoe_prefill
from finemoe.layers import DenseConfig, DSMoEConfig

TILES = [(8, 4), (4, 4), (8, 8), (16, 4), (16, 8), (32, 8), (32, 16), (64, 16)]


def main(d: int = 1024, F: int = 4096, n: int = 8, tokens: int = 16384) -> None:
    torch.manual_seed(0)
    dense = DenseConfig(intermediate_size=F).build(d).cuda().eval()
    layer = DSMoEConfig(intermediate_size=F, num_experts=n).build(d).cuda().eval()
    h = torch.randn(1, tokens, d, device="cuda")
    h_ND = h.reshape(-1, d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tokens {tokens}, d {d}, n {n}")

    def kernel():
        dsmoe_prefill.norm_and_gates(h_ND, layer.norm.weight, layer.gate.weight, 1e-5, 0.5, torch.bfloat16)

    default = dict(dsmoe_prefill.NORM_TILE)
    reference = None
    times = {}
    for rows, warps in TILES:
        dsmoe_prefill.NORM_TILE.update(ROWS=rows, num_warps=warps)
        x, G = dsmoe_prefill.norm_and_gates(h_ND, layer.norm.weight, layer.gate.weight, 1e-5, 0.5, torch.bfloat16)
        if reference is None:
            reference = x, G
        same = torch.equal(x, reference[0]) and torch.allclose(G, reference[1], rtol=0, atol=1e-6)
        times[rows, warps] = gpu_ms(kernel, calls=20) * 1e3
        print(f"rows {rows}, warps {warps}: {times[rows, warps]:.1f} µs (same output as the first: {same})",
              flush=True)
    best = min(times, key=times.get)
    dense_graph = cuda_graph_forward(dense, h, autocast)
    for label, (rows, warps) in [("default", (default["ROWS"], default["num_warps"])), ("fastest", best)] * 2:
        dsmoe_prefill.NORM_TILE.update(ROWS=rows, num_warps=warps)
        dense_ms = median_ms(dense_graph, warmup=5, repeats=30)
        layer_ms = median_ms(cuda_graph_forward(layer, h, autocast), warmup=5, repeats=30)
        print(f"prefill as a CUDA graph, {label} tile ({rows}, {warps}): {layer_ms:.3f} ms against dense's "
              f"{dense_ms:.3f}: {dense_ms / layer_ms:.2f}x", flush=True)
    dsmoe_prefill.NORM_TILE.update(default)


if __name__ == "__main__":
    main()
