"""DSMoE decoding with a batch of one token, taken apart (issue 11, item 5).

In one process, at the layer benchmark's size (d = 1024, F = 4096, n = 8 blocks, bf16
autocast, forward, eval), each forward replayed as one CUDA graph: the dense FFN, then
the DSMoE layer's decode kernels (``finemoe.kernels.dsmoe_decode``) for a sweep of tile
shapes and warps, then the GPU time of each kernel at the default tiles and the best.

    python benchmarks/experiments/dsmoe_decode.py > results/experiments/dsmoe_decode/h100.txt
"""

from __future__ import annotations

import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finemoe.kernels.dsmoe_decode as kernels  # noqa: E402
from finemoe.layers import DenseConfig, DSMoEConfig  # noqa: E402
from layer_benchmark import cuda_graph_forward as graphed, median_ms as shared_median_ms  # noqa: E402

median_ms = partial(shared_median_ms, warmup=10, repeats=50)


def main() -> None:
    d, F, n = 1024, 4096, 8
    torch.manual_seed(0)
    dense = DenseConfig(intermediate_size=F).build(d).cuda().eval()
    layer = DSMoEConfig(intermediate_size=F, num_experts=n).build(d).cuda().eval()
    x = torch.randn(1, 1, d, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        share = float(layer.gates(layer.norm(x).reshape(-1, d))[2].float().mean())
    dense_ms = median_ms(graphed(dense, x, autocast))
    print(f"blocks on for this token: {share:.0%}; dense forward as a CUDA graph: {dense_ms * 1e3:.1f} µs")
    names = ("_BLOCK_F", "_BLOCK_K", "_BLOCK_D", "_NUM_WARPS")
    default = tuple(getattr(kernels, name) for name in names)
    print("| BLOCK_F | BLOCK_K | BLOCK_D | warps | µs | vs dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    results = []
    for tiles in itertools.product((16, 32, 64), (64, 128, 256), (32, 64), (2, 4)):
        for name, value in zip(names, tiles):
            setattr(kernels, name, value)
        ms = median_ms(graphed(layer, x, autocast))
        results.append((ms, tiles))
        print(f"| {' | '.join(map(str, tiles))} | {ms * 1e3:.1f} | {dense_ms / ms:.2f} |", flush=True)
    best = min(results)
    print(f"best: {dict(zip(names, best[1]))}: {best[0] * 1e3:.1f} µs ({dense_ms / best[0]:.2f}× dense)")
    for label, tiles in (("default", default), ("best", best[1])):
        for name, value in zip(names, tiles):
            setattr(kernels, name, value)
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), autocast:
            for _ in range(3):
                layer(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    layer(x)
                torch.cuda.synchronize()
        print(f"GPU time per call by kernel, {label} tiles {tiles}:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
