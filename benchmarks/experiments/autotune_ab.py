"""Experiment: the compiled layers with Inductor's GEMM autotuning on (``max_autotune``,
the persistent TMA Triton templates enabled: ``triton.enable_persistent_tma_matmul``)
against the default compilation (cuBLAS / torch's CUTLASS grouped GEMM). At the layer
benchmark's shapes the persistent templates time at or below cuBLAS, and Inductor's
Triton grouped-GEMM template below torch's CUTLASS one
(results/experiments/autotune/triton_gemm_ceiling_h100.log). GPU time per forward +
backward (profiler), both variants in one process.

    python benchmarks/experiments/autotune_ab.py dense "moe E=8 k=2"
"""

from __future__ import annotations

import sys

import torch._inductor.config as inductor_config
from compiled_ab import compare


def _autotuned():
    before = inductor_config.max_autotune, inductor_config.triton.enable_persistent_tma_matmul
    inductor_config.max_autotune = True
    inductor_config.triton.enable_persistent_tma_matmul = True

    def restore():
        inductor_config.max_autotune, inductor_config.triton.enable_persistent_tma_matmul = before
    return restore


if __name__ == "__main__":
    compare(sys.argv[1:] or ("dense", "moe E=8 k=2"),
            {"default": lambda: (lambda: None), "max_autotune + persistent TMA": _autotuned})
