"""Causal attention forward + backward through each ``scaled_dot_product_attention``
backend at a preset's shape, bf16, in one process: which backend the model should ask for.

    python benchmarks/attention_backends.py --batch 32 --seq 1024 --heads 12 --kv-heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_fwd_bwd(q, k, v, gqa: bool, repeats: int = 20) -> float:
    def step():
        kk, vv = k, v
        if not gqa and k.shape[1] != q.shape[1]:  # expand the key/value heads for backends without GQA
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            vv = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    shape = lambda h: (args.batch, h, args.seq, args.head_dim)  # noqa: E731
    q = torch.randn(shape(args.heads), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape(args.kv_heads), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape(args.kv_heads), device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 4 * args.batch * args.heads * args.seq * args.seq * args.head_dim / 2 * 3.5  # causal; bwd ≈ 2.5 × fwd
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={args.batch} T={args.seq} "
          f"H={args.heads} G={args.kv_heads} d={args.head_dim}, causal, bf16, forward + backward")
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name)
        for gqa in (True, False):
            try:
                with sdpa_kernel(backend):
                    ms = time_fwd_bwd(q, k, v, gqa)
                print(f"  {name:20s} {'enable_gqa' if gqa else 'expanded kv':12s} {ms:7.3f} ms  "
                      f"{flops / ms / 1e9:6.1f} TFLOP/s")
            except RuntimeError as err:
                print(f"  {name:20s} {'enable_gqa' if gqa else 'expanded kv':12s} unavailable: {str(err).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
