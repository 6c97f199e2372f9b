"""Experiment: the routers' float32 products under ``torch.compile`` as cuBLAS float32
GEMMs against finemoe's router kernels (``finemoe.kernels.router``). GPU time per
forward + backward (profiler), both variants in one process.

    python benchmarks/experiments/router_kernel_ab.py
"""

from __future__ import annotations

from compiled_ab import compare

import finemoe.layers.common as common


def _cublas():
    supported = common.router_linear_supported
    common.router_linear_supported = lambda x, weight: False

    def restore():
        common.router_linear_supported = supported
    return restore


if __name__ == "__main__":
    compare(("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
             "cartesian (8 sub-experts, k=2, + shared)", "dsmoe n=8 (training path)"),
            {"cuBLAS float32 GEMMs": _cublas, "router kernels": lambda: (lambda: None)})
