"""Experiment: the routers' float32 products on finemoe's skinny-product kernels
(``finemoe.kernels.skinny_linear``) against cuBLAS (``F.linear`` with autocast off), in one
process.

1. The product alone, forward + backward, at the routers' shapes (16,384 tokens, d = 1024).
2. GPU time (profiler) per compiled forward + backward of the routed layers, each path; the
   token-choice layers on QuACK's experts when it is installed (the path of their targets).

    python benchmarks/experiments/router_kernel_ab.py      # PYTHONPATH=<quack's site> for QuACK
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiled_ab import compare
from profile_layer import gpu_ms
from quack_experts_ab import _use as use_quack

from finemoe.layers import common, experts

LAYERS = ("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
          "cartesian (8 sub-experts, k=2, + shared)", "dsmoe n=8 (training path)")
_original = common.skinny_linear_applies


def _kernels(on: bool):
    def setup():
        restore_quack = use_quack(experts.quack_installed())()
        common.skinny_linear_applies = _original if on else (lambda x, w: False)

        def restore():
            common.skinny_linear_applies = _original
            restore_quack()
        return restore
    return setup


def product_alone(tokens: int = 16384, d: int = 1024) -> None:
    print("| outputs | cuBLAS µs | kernels µs |\n|---|---:|---:|")
    for outputs in (8, 16):
        x = torch.randn(tokens, d, device="cuda", requires_grad=True)
        w = (torch.randn(outputs, d, device="cuda") * 0.02).requires_grad_(True)
        probe = torch.randn(tokens, outputs, device="cuda")
        times = []
        for on in (False, True):
            restore = _kernels(on)()

            def step():
                common.float32_linear(x, w).backward(probe)
            try:
                times.append(gpu_ms(step, calls=20) * 1e3)
            finally:
                restore()
        print(f"| {outputs} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, "QuACK experts:", experts.quack_installed(), flush=True)
    product_alone()
    compare(LAYERS, {"cuBLAS router": _kernels(False), "kernel router": _kernels(True)})
