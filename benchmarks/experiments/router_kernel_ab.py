"""Experiment: the routers' float32 products on finemoe's skinny-product kernels
(``finemoe.kernels.skinny_linear``: FMA products in 3-d tiles) against cuBLAS (``F.linear``
with autocast off), in one process.

1. The product alone at the routers' shapes (16,384 tokens, d = 1024): forward, and
   forward + backward, GPU time (profiler), over a few tiles of each kernel.
2. GPU time per compiled forward + backward of the routed layers, each path; the
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

from finemoe.kernels import skinny_linear as kernels
from finemoe.layers import common, experts

OUTPUTS = (8,)  # the first run (ee0633d) also swept 10 and 16 outputs: cuBLAS was faster there
LAYERS = ("dense", "moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
          "cartesian (8 sub-experts, k=2, + shared)", "dsmoe n=8 (training path)")
_original = common.skinny_linear_applies

FORWARD_TILES = [{"BLOCK_N": n, "BLOCK_D": d, "num_warps": w} for n, d, w in
                 [(8, 64, 2), (4, 64, 1), (8, 32, 1), (8, 64, 1), (16, 64, 2), (8, 128, 2), (16, 32, 2), (4, 128, 2)]]
BACKWARD_TILES = [{"BLOCK_N": n, "BLOCK_D": d, "ROWS": r, "num_warps": w} for n, d, r, w in
                  [(16, 64, 256, 4), (16, 32, 256, 2), (32, 32, 256, 4), (16, 64, 512, 4), (16, 64, 128, 4),
                   (8, 64, 256, 2), (32, 64, 256, 8), (8, 32, 256, 1), (16, 32, 512, 2), (32, 32, 512, 4)]]


def _kernels(on: bool):
    def setup():
        restore_quack = use_quack(experts.quack_installed())()
        common.skinny_linear_applies = _original if on else (lambda x, w: False)

        def restore():
            common.skinny_linear_applies = _original
            restore_quack()
        return restore
    return setup


def product_alone(tokens: int = 16384, d: int = 1024) -> tuple[dict, dict]:
    """GPU µs of the product (forward; forward + backward) under cuBLAS and each tile;
    returns the fastest forward and backward tiles at E = 8."""
    best = {}
    for outputs in OUTPUTS:
        x = torch.randn(tokens, d, device="cuda", requires_grad=True)
        w = (torch.randn(outputs, d, device="cuda") * 0.02).requires_grad_(True)
        probe = torch.randn(tokens, outputs, device="cuda")

        def forward(x=x, w=w):
            with torch.no_grad():
                common.float32_linear(x, w)

        def both(x=x, w=w, probe=probe):
            common.float32_linear(x, w).backward(probe)
        restore = _kernels(False)()
        try:
            print(f"E = {outputs}: cuBLAS forward {gpu_ms(forward, calls=20) * 1e3:.1f} µs, "
                  f"forward + backward {gpu_ms(both, calls=20) * 1e3:.1f} µs", flush=True)
        finally:
            restore()
        restore = _kernels(True)()
        try:
            for pass_, label, tiles, setting, step in (("forward", "forward", FORWARD_TILES, kernels.FORWARD_TILE, forward),
                                                       ("backward", "forward + backward", BACKWARD_TILES,
                                                        kernels.BACKWARD_TILE, both)):
                before = dict(setting)
                try:
                    for tile in tiles:
                        setting.update(tile)
                        us = gpu_ms(step, calls=20) * 1e3
                        print(f"  {label} {tile}: {us:.1f} µs", flush=True)
                        if outputs == 8 and us < best.get(pass_, (1e9,))[0]:
                            best[pass_] = (us, tile)
                finally:
                    setting.update(before)
        finally:
            restore()
    return best["forward"][1], best["backward"][1]


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, "QuACK experts:", experts.quack_installed(), flush=True)
    forward_tile, backward_tile = product_alone()
    kernels.FORWARD_TILE.update(forward_tile)
    kernels.BACKWARD_TILE.update(backward_tile)
    print("layers with the fastest tiles at E = 8:", forward_tile, backward_tile, flush=True)
    if "--product-only" not in sys.argv:
        compare(LAYERS, {"cuBLAS router": _kernels(False), "kernel router": _kernels(True)})
