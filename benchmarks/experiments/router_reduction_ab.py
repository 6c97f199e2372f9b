"""Experiment: a router's float32 product under ``torch.compile`` as cuBLAS float32 GEMMs
of skinny shapes (``float32_linear``'s autograd function) against a product and a sum
over D that Inductor fuses with its neighbours (``FEW_COLUMNS_AS_REDUCTION``). GPU time
per forward + backward (profiler), both variants in one process.

    python benchmarks/experiments/router_reduction_ab.py
"""

from __future__ import annotations

from compiled_ab import compare

import finemoe.layers.common as common


def _columns(limit: int):
    def setup():
        before = common.FEW_COLUMNS_AS_REDUCTION
        common.FEW_COLUMNS_AS_REDUCTION = limit

        def restore():
            common.FEW_COLUMNS_AS_REDUCTION = before
        return restore
    return setup


if __name__ == "__main__":
    names = ("dense", "moe E=8 k=2", "moe SMoE-Share (E=8 k=2 F/4 + shared)", "cartesian (8 sub-experts, k=2, + shared)",
             "dsmoe n=8 (training path)", "moe E=64 k=8 (fine-grained)")
    compare(names, {"cuBLAS GEMMs": _columns(0), "product and sum (≤ 16 columns)": _columns(16),
                    "product and sum (≤ 64 columns)": _columns(64)})
