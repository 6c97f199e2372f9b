"""Experiment: what a layer's CUDA-graph wall time holds beyond its kernels' GPU time, and
how that follows the number of kernels a step launches.

For each layer (named as in ``layer_benchmark.py``), in one process: kernels launched per
compiled forward + backward and their GPU time (profiler), then the median wall time of
the same step compiled with ``mode="reduce-overhead"`` (CUDA graphs), as the layer
benchmark times it. The token-choice layers run on QuACK when it is installed.

    python benchmarks/experiments/graph_overhead.py      # PYTHONPATH=<quack's site> for QuACK
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiled_ab import fresh_layer, layer_inputs
from layer_benchmark import fwd_bwd, median_ms
from profile_layer import kernel_averages
from quack_experts_ab import _use as use_quack

from finemoe.layers import experts

LAYERS = ("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "cartesian (8 sub-experts, k=2, + shared)",
          "dsmoe n=8 (training path)", "finedeep 2x4")


def main(d: int = 1024, tokens: int = 16384, steps: int = 10) -> None:
    use_quack(experts.quack_installed())()
    h, cotangent, autocast = layer_inputs(d, tokens)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, QuACK experts: {experts.quack_installed()}; "
          f"{tokens} tokens, d = {d}")
    print("| layer | kernels per step | GPU ms | CUDA-graph wall ms | wall − GPU ms |\n|---|---:|---:|---:|---:|")
    for name in LAYERS:
        row = []
        for cuda_graphs in (False, True):
            layer = fresh_layer(name, d, cuda_graphs)
            step = fwd_bwd(layer, h, cotangent, autocast)
            if cuda_graphs:
                row.append(median_ms(step, warmup=5, repeats=30))
            else:
                averages = [e for e in kernel_averages(step, steps, warmup=3) if e.self_device_time_total > 0]
                row += [sum(e.count for e in averages) / steps,
                        sum(e.self_device_time_total for e in averages) / 1e3 / steps]
        kernels, gpu, wall = row
        print(f"| {name} | {kernels:.0f} | {gpu:.3f} | {wall:.3f} | {wall - gpu:.3f} |", flush=True)


if __name__ == "__main__":
    main()
