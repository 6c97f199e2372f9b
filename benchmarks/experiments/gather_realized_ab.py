"""Experiment: the routed layers' slot gather under ``torch.compile`` as ``index_select``
(Inductor recomputes the norm and the cast per gathered row) against finemoe's row-gather
kernel (the half-precision input written once, then gathered). GPU time per forward +
backward (profiler), both variants in one process.

    python benchmarks/experiments/gather_realized_ab.py
"""

from __future__ import annotations

from compiled_ab import compare

import finemoe.layers.experts as experts


def _index_select():
    available = experts.triton_kernels_available
    experts.triton_kernels_available = lambda x: False

    def restore():
        experts.triton_kernels_available = available
    return restore


if __name__ == "__main__":
    compare(("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
             "cartesian (8 sub-experts, k=2, + shared)"),
            {"index_select": _index_select, "row-gather kernel": lambda: (lambda: None)})
