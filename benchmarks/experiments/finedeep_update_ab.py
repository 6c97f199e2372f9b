"""Experiment: how Finedeep forms its update, in one process (GPU time per compiled
forward + backward, ``compiled_ab.compare``).

- ``h_M − h_0``: the residual chain h_m = h_{m−1} + y_m, then the difference (before).
- ``Σ y_m, adds``: the update summed term by term, sub-layer m + 1 reading h_0 + Σ_{j≤m} y_j.
- ``Σ y_m, addmm``: the same, each term added in its down product's epilogue (the library).

    python benchmarks/experiments/finedeep_update_ab.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compiled_ab import compare

from finemoe.layers.base import FFNOutput
from finemoe.layers.finedeep import FinedeepFFN

_library = FinedeepFFN.forward


def _difference(self, h_BTD, *, stats=None, context=None):
    B, T, D = h_BTD.shape
    h_ND = x_ND = h_BTD.reshape(B * T, D)
    for m in range(self.config.num_sublayers):
        x_ND = x_ND + self.sublayer(m, x_ND)
    return FFNOutput(update=(x_ND - h_ND).reshape(B, T, D))


def _adds(self, h_BTD, *, stats=None, context=None):
    B, T, D = h_BTD.shape
    h_ND = h_BTD.reshape(B * T, D)
    update_ND = None
    for m in range(self.config.num_sublayers):
        y_ND = self.sublayer(m, h_ND if update_ND is None else h_ND + update_ND)
        update_ND = y_ND if update_ND is None else update_ND + y_ND
    return FFNOutput(update=update_ND.reshape(B, T, D))


def _variant(forward):
    def setup():
        FinedeepFFN.forward = forward

        def restore():
            FinedeepFFN.forward = _library
        return restore
    return setup


if __name__ == "__main__":
    compare(["dense", "finedeep 2x4", "finedeep 4x4"],
            {"h_M − h_0": _variant(_difference), "Σ y_m, adds": _variant(_adds), "Σ y_m, addmm": _variant(_library)})
