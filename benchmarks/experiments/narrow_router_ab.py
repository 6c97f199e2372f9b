"""Experiment: the routers' float32 products under ``torch.compile`` as cuBLAS float32
GEMMs of skinny shapes (``_Float32Linear``) against ``_Float32NarrowLinear``: each output
column a reduction over the row that Inductor fuses into the norm's kernel, the input
gradient as multiply-adds fused into the norm's backward, and the weight gradient either
by cuBLAS or as column reductions. GPU time per forward + backward (profiler), all
variants in one process.

    python benchmarks/experiments/narrow_router_ab.py [--columns 64] [layer names...]
"""

from __future__ import annotations

import argparse

import torch
from compiled_ab import compare
from layer_benchmark import fwd_bwd, layer_configs
from profile_layer import print_profile

from finemoe.config import from_dict
from finemoe.layers import FFNConfig, common


def _variant(columns: int, weight_grad_as_reduction: bool):
    def setup():
        before = common.NARROW_COLUMNS, common.NARROW_WEIGHT_GRAD_AS_REDUCTION
        common.NARROW_COLUMNS, common.NARROW_WEIGHT_GRAD_AS_REDUCTION = columns, weight_grad_as_reduction

        def restore():
            common.NARROW_COLUMNS, common.NARROW_WEIGHT_GRAD_AS_REDUCTION = before
        return restore
    return setup


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*", default=["dense", "moe E=8 k=2", "moe E=8 k=2 [experts_impl=quack]"])
    parser.add_argument("--columns", type=int, default=16, help="the widest router written as reductions")
    parser.add_argument("--profile", default=None, help="a layer whose kernels to print under each variant")
    args = parser.parse_args()
    variants = {"cuBLAS": _variant(0, False),
                f"narrow ≤ {args.columns}, weight grad cuBLAS": _variant(args.columns, False),
                f"narrow ≤ {args.columns}, weight grad reductions": _variant(args.columns, True)}
    compare(args.names, variants)
    if args.profile:
        d, tokens = 1024, 16384
        h = torch.randn(tokens // 512, 512, d, device="cuda", requires_grad=True)
        cotangent = torch.randn(h.shape, device="cuda")
        for label, setup in variants.items():
            restore = setup()
            try:
                torch._dynamo.reset()
                layer = torch.compile(from_dict(FFNConfig, dict(layer_configs(d)[args.profile])).build(d).cuda().train())
                print(f"\nkernels of one compiled step: {args.profile}, {label}")
                print_profile(fwd_bwd(layer, h, cotangent, torch.autocast("cuda", dtype=torch.bfloat16)), steps=5, rows=25)
            finally:
                restore()
