"""DSMoE sparse inference for a prefill batch, taken apart (issue 11, item 5).

In one process, at the layer benchmark's size (16,384 tokens, d = 1024, F = 4096,
n = 8 blocks, bf16 autocast, forward, eval): the dense FFN's forward; the DSMoE layer
through its three sparse paths (the exactly-sized reference with one host sync, the
sync-free path through torch's grouped GEMM, and the gathered-SwiGLU kernel) and, for
the kernel, a few tile shapes; then a profile of the kernel path's GPU time by kernel.

    python benchmarks/experiments/dsmoe_prefill.py > results/experiments/dsmoe_prefill/h100.txt
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finemoe.kernels.gathered_swiglu as kernel  # noqa: E402
import finemoe.layers.dsmoe as dsmoe_module  # noqa: E402
from finemoe.layers import DenseConfig, DSMoEConfig  # noqa: E402
from layer_benchmark import cuda_graph_forward as graphed, median_ms as shared_median_ms  # noqa: E402


median_ms = partial(shared_median_ms, warmup=5, repeats=30)


def main() -> None:
    d, F, n, tokens = 1024, 4096, 8, 16384
    torch.manual_seed(0)
    dense = DenseConfig(intermediate_size=F).build(d).cuda().eval()
    layer = DSMoEConfig(intermediate_size=F, num_experts=n).build(d).cuda().eval()
    h = torch.randn(1, tokens, d, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def forward(module):
        @torch.no_grad()
        def run():
            with autocast:
                module(h)
        return run

    with torch.no_grad(), autocast:
        u = layer.norm(h).reshape(-1, d)
        a, G, active = layer.gates(u)
        ref = layer.masked_forward(u, a, G, active).float()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tokens {tokens}, d {d}, F {F}, n {n}; "
          f"active share {float(active.float().mean()):.3f}")

    dense_ms = median_ms(forward(dense))
    print(f"dense forward: {dense_ms:.3f} ms")

    dense_graph_ms = median_ms(graphed(dense, h, autocast))
    print(f"dense forward as a CUDA graph: {dense_graph_ms:.3f} ms")

    def report(label, graph=True):
        with torch.no_grad(), autocast:
            got = layer.sparse_forward(u, G, active).float()
        err = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        ms = median_ms(forward(layer))
        line = f"{label}: {ms:.3f} ms, {dense_ms / ms:.2f}x dense, rel. error vs masked {err:.2e}"
        if graph:
            graph_ms = median_ms(graphed(layer, h, autocast))
            line += f"; as a CUDA graph {graph_ms:.3f} ms, {dense_graph_ms / graph_ms:.2f}x dense's graph"
        print(line)

    layer.config.experts_impl = "eager"
    report("reference (nonzero, exact sizes, one host sync; experts_impl=eager)", graph=False)
    layer.config.experts_impl = "auto"
    pairs = torch.arange(n * tokens, device="cuda") % tokens
    counts = active.sum(0)
    x = u.to(torch.bfloat16)
    w_gate, w_up, _ = layer.block_weights()
    applies = dsmoe_module.gathered_swiglu_applies
    dsmoe_module.gathered_swiglu_applies = lambda *args: False
    report("sync-free, gather + torch grouped GEMMs")
    dsmoe_module.gathered_swiglu_applies = applies
    default = (kernel._BLOCK_M, kernel._BLOCK_N, kernel._BLOCK_K, kernel._WARPS, kernel._STAGES)
    for tiles in [default, (128, 64, 64, 8, 3), (128, 128, 32, 8, 4), (256, 64, 64, 8, 3), (128, 128, 64, 4, 3)]:
        kernel._BLOCK_M, kernel._BLOCK_N, kernel._BLOCK_K, kernel._WARPS, kernel._STAGES = tiles
        try:
            kernel_ms = median_ms(lambda: [kernel.gathered_swiglu(x, pairs, G.reshape(-1), counts, w_gate, w_up)
                                           for _ in range(20)]) / 20
            report(f"gathered-SwiGLU kernel, tiles M N K warps stages = {tiles} (the kernel alone {kernel_ms:.3f} ms)")
        except Exception as error:  # noqa: BLE001 - a tile shape the GPU cannot take (shared memory)
            print(f"tiles {tiles}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    kernel._BLOCK_M, kernel._BLOCK_N, kernel._BLOCK_K, kernel._WARPS, kernel._STAGES = default

    run = forward(layer)
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    print("\nGPU time of the kernel path by kernel (10 calls):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
