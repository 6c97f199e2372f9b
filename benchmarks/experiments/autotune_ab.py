"""Experiment: the compiled layers with Inductor's GEMM autotuning on (``max_autotune``,
the persistent TMA Triton templates enabled: ``triton.enable_persistent_tma_matmul``)
against the default compilation (cuBLAS / torch's CUTLASS grouped GEMM). At the layer
benchmark's shapes the persistent templates time at or below cuBLAS, and Inductor's
Triton grouped-GEMM template below torch's CUTLASS one
(results/experiments/autotune/triton_gemm_ceiling_h100.log). GPU time per forward +
backward (profiler), the variants in one process. The third variant also gathers the
routed layers' slots with ``index_select`` instead of finemoe's row kernel (an opaque op),
so that Inductor may fuse the gather into the grouped template's prologue.

    python benchmarks/experiments/autotune_ab.py dense "moe E=8 k=2"
"""

from __future__ import annotations

import sys

import torch._inductor.config as inductor_config
from compiled_ab import compare
from gather_realized_ab import _index_select


def _autotuned():
    before = inductor_config.max_autotune, inductor_config.triton.enable_persistent_tma_matmul
    inductor_config.max_autotune = True
    inductor_config.triton.enable_persistent_tma_matmul = True

    def restore():
        inductor_config.max_autotune, inductor_config.triton.enable_persistent_tma_matmul = before
    return restore


def _autotuned_index_select():
    restores = (_autotuned(), _index_select())

    def restore():
        for undo in restores:
            undo()
    return restore


if __name__ == "__main__":
    compare(sys.argv[1:] or ("dense", "moe E=8 k=2"),
            {"default": lambda: (lambda: None), "max_autotune + persistent TMA": _autotuned,
             "same + index_select gather": _autotuned_index_select})
