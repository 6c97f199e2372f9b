"""Experiment: the routed layers' slot gather under ``torch.compile`` as ``index_select``
(Inductor recomputes the norm and the cast per gathered row) against finemoe's row-gather
kernel (the half-precision input written once, then gathered). GPU time per forward +
backward (profiler), both variants in one process.

    python benchmarks/experiments/gather_realized_ab.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import fwd_bwd, layer_configs  # noqa: E402
from profile_layer import gpu_ms  # noqa: E402

import finemoe.layers.experts as experts  # noqa: E402
from finemoe.config import from_dict  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402

NAMES = ("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
         "cartesian (8 sub-experts, k=2, + shared)")


def main() -> None:
    d = 1024
    configs = layer_configs(d)
    h = torch.randn(32, 512, d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    kernel_available = experts.triton_kernels_available
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPU ms per forward + backward (compiled)")
    print("| layer | index_select | row-gather kernel |")
    print("|---|---:|---:|")
    for name in NAMES:
        times = []
        for use_kernel in (False, True):
            experts.triton_kernels_available = kernel_available if use_kernel else (lambda x: False)
            torch._dynamo.reset()
            torch.manual_seed(0)
            layer = torch.compile(from_dict(FFNConfig, dict(configs[name])).build(d).cuda().train())
            times.append(gpu_ms(fwd_bwd(layer, h, cotangent, autocast), calls=10))
        experts.triton_kernels_available = kernel_available
        print(f"| {name} | {times[0]:.3f} | {times[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
