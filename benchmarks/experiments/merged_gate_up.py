"""Experiment: one grouped GEMM for the gate and up projections of an expert bank
(weights ``(E, D, 2F)``) against two (``(E, D, F)`` each), forward + backward in bf16,
at the routed shapes of the layer benchmark. Prints the median times in ms.

    python benchmarks/experiments/merged_gate_up.py
"""

from __future__ import annotations

import torch


def timed(fn, repeats=30, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    gmm = torch._grouped_mm
    N, D = 16384, 1024
    print("| shape | two GEMMs fwd+bwd ms | one merged GEMM fwd+bwd ms | gain ms |")
    print("|---|---:|---:|---:|")
    for E, F, K in [(8, 2048, 2), (64, 512, 8), (8, 512, 2)]:
        S = N * K
        counts = torch.full((E,), S // E, dtype=torch.int32, device="cuda")
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x = torch.randn(S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wg = (torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        wu = (torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        wgu = torch.cat([wg.detach(), wu.detach()], -1).requires_grad_()
        grad = torch.randn(S, F, device="cuda", dtype=torch.bfloat16)
        grad2 = torch.cat([grad, grad], -1)

        def two():
            g, u = gmm(x, wg, offs=offs), gmm(x, wu, offs=offs)
            torch.autograd.backward([g, u], [grad, grad])

        def one():
            gu = gmm(x, wgu, offs=offs)
            gu.backward(grad2)

        t2, t1 = timed(two), timed(one)
        print(f"| E={E} F={F} k={K} | {t2:.3f} | {t1:.3f} | {t2 - t1:.3f} |")


if __name__ == "__main__":
    main()
