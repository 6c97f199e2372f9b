"""Experiment: the compiled layers under Inductor's tuning options against the default
compilation (cuBLAS / torch's CUTLASS grouped GEMM, Inductor's heuristic tiles):

- ``max_autotune``: GEMMs autotuned over Inductor's Triton templates, the persistent TMA
  ones enabled (``triton.enable_persistent_tma_matmul``). At the layer benchmark's shapes
  the persistent templates time close to cuBLAS, and Inductor's Triton grouped-GEMM
  template below torch's CUTLASS one on some shapes
  (results/experiments/autotune/triton_gemm_ceiling_h100.log);
- the same with the routed layers' slots gathered by ``index_select`` instead of finemoe's
  row kernel (an opaque op), so that Inductor may fuse the gather into the grouped
  template's prologue;
- ``coordinate_descent_tuning``: Inductor tunes the tiles of its element-wise and
  reduction kernels (norms, SwiGLU, casts) by timing neighbours of its heuristic choice.

GPU time per forward + backward (profiler), the variants in one process.

    python benchmarks/experiments/autotune_ab.py dense "moe E=8 k=2" [--variants default,coordinate_descent]
"""

from __future__ import annotations

import argparse

import torch._inductor.config as inductor_config
from compiled_ab import compare
from gather_realized_ab import _index_select


def _setting(options: dict):
    """A variant that sets Inductor options (dotted names, ``inductor_config.patch``) and
    restores them after."""
    def setup():
        patch = inductor_config.patch(options)
        patch.__enter__()
        return lambda: patch.__exit__(None, None, None)
    return setup


_autotuned = _setting({"max_autotune": True, "triton.enable_persistent_tma_matmul": True})


def _autotuned_index_select():
    restores = (_autotuned(), _index_select())

    def restore():
        for undo in restores:
            undo()
    return restore


VARIANTS = {
    "default": lambda: (lambda: None),
    "max_autotune": _autotuned,
    "max_autotune_index_select": _autotuned_index_select,
    "coordinate_descent": _setting({"coordinate_descent_tuning": True}),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("layers", nargs="*", default=["dense", "moe E=8 k=2"])
    parser.add_argument("--variants", default="default,max_autotune,max_autotune_index_select")
    args = parser.parse_args()
    compare(args.layers, {name: VARIANTS[name] for name in args.variants.split(",")})
