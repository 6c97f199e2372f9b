"""Experiment: where PEER's (and PKM's) forward + backward time goes at issue 12's size
(16,384 tokens, d = 1024, 1024² experts, 8 heads, key width 256), all in one process:
the whole layer with each combination of eager / Triton retrieval and experts,
retrieval alone, the expert kernel alone (forward; forward + backward), with --sweep
the kernels' tile sizes, and with --profile the top CUDA kernels of the Triton layer.

    python benchmarks/experiments/peer_parts.py [--kinds peer,pkm] [--sweep] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import fwd_bwd, product_key_configs, time_ms  # noqa: E402
from profile_layer import print_profile  # noqa: E402

from finemoe.config import from_dict  # noqa: E402
from finemoe.kernels import peer_experts as experts_kernel  # noqa: E402
from finemoe.kernels import product_keys as retrieval_kernel  # noqa: E402
from finemoe.kernels.peer_experts import peer_experts  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="peer,pkm")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    d = 1024
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    h = torch.randn(args.tokens // 512, 512, d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    configs = product_key_configs(d)
    for kind in args.kinds.split(","):
        name = next(n for n in configs if n.startswith(kind) and "triton" in n)
        torch.manual_seed(0)
        layer = from_dict(FFNConfig, dict(configs[name])).build(d).cuda().train()
        state = layer.state_dict()
        rows = {}
        for retrieval in ("eager", "triton"):
            for experts in ("eager", "triton"):
                variant = layer.config.replace(retrieval_impl=retrieval, experts_impl=experts).build(d).cuda().train()
                variant.load_state_dict(state)
                rows[f"layer [retrieval {retrieval}, experts {experts}] fwd+bwd"] = time_ms(
                    fwd_bwd(variant, h, cotangent, autocast), "cuda", 3, 10)
                del variant
        with torch.no_grad(), autocast:
            u = layer.norm(h).reshape(-1, d)
            idx, gates = layer.retrieval.route(u)
        share = torch.unique(idx).numel() / layer.config.num_experts

        probe = torch.randn(gates.shape, device="cuda")

        def retrieval():
            with autocast:
                _, g = layer.retrieval.route(u.detach().requires_grad_(True))
            g.backward(probe)
            for p in layer.parameters():
                p.grad = None
        for impl in ("eager", "triton"):
            layer.retrieval.config = layer.retrieval.config.replace(retrieval_impl=impl)
            rows[f"retrieval [{impl}] fwd+bwd"] = time_ms(retrieval, "cuda", 3, 10)
        if args.sweep:
            for splits in (1, 4, 64):
                retrieval_kernel._SPLITS = splits
                rows[f"retrieval [triton, sub-key pass in {splits} parts] fwd+bwd"] = time_ms(retrieval, "cuda", 3, 10)
            retrieval_kernel._SPLITS = 16
        expert_in = layer.expert_in if kind == "peer" else None
        expert_out = layer.expert_out if kind == "peer" else layer.values
        activation = layer.config.activation if kind == "peer" else "none"
        x = u.detach().requires_grad_(True)
        g = gates.detach().reshape(len(u), -1).requires_grad_(True)
        i = idx.reshape(len(u), -1)

        @torch.no_grad()
        def experts_fwd():
            peer_experts(x, i, g, expert_in, expert_out, activation)

        def experts_fwd_bwd():
            y = peer_experts(x, i, g, expert_in, expert_out, activation)
            y.backward(cotangent.reshape(y.shape).to(y.dtype))
            x.grad = g.grad = None
            for p in layer.parameters():
                p.grad = None
        rows["experts fwd"] = time_ms(experts_fwd, "cuda", 3, 10)
        rows["experts fwd+bwd"] = time_ms(experts_fwd_bwd, "cuda", 3, 10)
        if args.sweep:
            default = experts_kernel._BLOCK_D, experts_kernel._ROW_BLOCK_D, experts_kernel._NUM_WARPS
            for warps in (4, 8):
                for block_d in (16, 32, 64, 128):
                    experts_kernel._BLOCK_D, experts_kernel._NUM_WARPS = block_d, warps
                    rows[f"experts fwd [BLOCK_D {block_d}, {warps} warps]"] = time_ms(experts_fwd, "cuda", 3, 10)
                    rows[f"experts fwd+bwd [BLOCK_D {block_d}, {warps} warps]"] = time_ms(experts_fwd_bwd, "cuda", 3, 10)
            experts_kernel._BLOCK_D, experts_kernel._NUM_WARPS = default[0], default[2]
            for row_block in (256, 512):
                experts_kernel._ROW_BLOCK_D = row_block
                rows[f"experts fwd+bwd [ROW_BLOCK_D {row_block}]"] = time_ms(experts_fwd_bwd, "cuda", 3, 10)
            experts_kernel._ROW_BLOCK_D = default[1]
        print(f"== {name}: {args.tokens} tokens, retrieved share of the pool in one batch {share:.3f}")
        for label, (ms, _, peak) in rows.items():
            print(f"  {label:56s} {ms:8.3f} ms   peak beyond parameters {peak:6.2f} GiB")
        print(f"  parameters {sum(p.numel() * p.element_size() for p in layer.parameters()) / 2**30:.2f} GiB")
        if args.profile:
            print_profile(fwd_bwd(layer, h, cotangent, autocast), 3, 18, name_width=60)
        del layer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
