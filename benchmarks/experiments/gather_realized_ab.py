"""Experiment: the routed layers' slot gather under ``torch.compile`` (the forward's
gather of the normed input) as ``index_select`` (Inductor recomputes the gathered
tensor's producers per row) against finemoe's row-gather kernel
(``finemoe.kernels.slots.gather_rows``). GPU time per forward + backward (profiler),
both variants in one process. (At 77aadcd the same kernel in ``sum_slots``' backward
measured no gain: results/experiments/gather/gather_ab_77aadcd_h100.txt.)

    python benchmarks/experiments/gather_realized_ab.py
"""

from __future__ import annotations

from compiled_ab import compare

from finemoe.layers import experts


def _index_select():
    before = experts.gather_rows
    experts.gather_rows = lambda x, token: x.index_select(0, token)

    def restore():
        experts.gather_rows = before
    return restore


if __name__ == "__main__":
    compare(("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
             "cartesian (8 sub-experts, k=2, + shared)"),
            {"index_select": _index_select, "row-gather kernel": lambda: (lambda: None)})
