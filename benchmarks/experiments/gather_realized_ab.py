"""Experiment: the routed layers' slot gathers under ``torch.compile`` (the forward's
gather of the normed input, and ``sum_slots``' backward, a gather of the output
gradient) as ``index_select`` (Inductor recomputes the gathered tensor's producers per
row) against finemoe's row-gather kernel (``finemoe.kernels.slots.gather_rows``). GPU
time per forward + backward (profiler), the variants in one process.

    python benchmarks/experiments/gather_realized_ab.py
"""

from __future__ import annotations

from compiled_ab import compare

import finemoe.kernels.slots as slots
import finemoe.layers.experts as experts


def _index_select(forward: bool, backward: bool):
    def setup():
        before = experts.gather_rows, slots.gather_rows

        def plain(x, token):
            return x.index_select(0, token)
        if forward:
            experts.gather_rows = plain
        if backward:
            slots.gather_rows = plain

        def restore():
            experts.gather_rows, slots.gather_rows = before
        return restore
    return setup


if __name__ == "__main__":
    compare(("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
             "cartesian (8 sub-experts, k=2, + shared)"),
            {"index_select": _index_select(True, True), "kernel in the forward (7d6737c)": _index_select(False, True),
             "kernel in the forward and the backward": _index_select(False, False)})
