"""Experiment: the weight gradient of an expert bank with float32 master weights, written
by the grouped GEMM in float32 (``torch._grouped_mm(..., out_dtype=torch.float32)``)
against the bf16 product followed by the cast autograd does now, at the routed shapes
of the layer benchmark (gate and up packed as one ``(E, D, 2f)`` product, down ``(E, f,
D)``). Checks that the float32 output is supported and equals the bf16 path up to its
rounding. Prints GPU times (CUDA events, median of 30; ``layer_benchmark.median_ms``).

    python benchmarks/experiments/grouped_weight_grad_float32.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import median_ms

timed = partial(median_ms, warmup=5, repeats=30)


def main() -> None:
    gmm = torch._grouped_mm
    N, D = 16384, 1024
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| shape | product | bf16 out + cast to float32 ms | float32 out ms | gain ms | max rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for E, f, K in [(8, 2048, 2), (64, 512, 8), (8, 512, 2)]:
        S = N * K
        counts = torch.full((E,), S // E, dtype=torch.int32, device="cuda")
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x = torch.randn(S, D, device="cuda", dtype=torch.bfloat16)
        for label, width_in, width_out in (("gate+up dW", D, 2 * f), ("down dW", f, D)):
            a = x if width_in == D else torch.randn(S, f, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(S, width_out, device="cuda", dtype=torch.bfloat16)
            try:
                out32 = gmm(a.t(), g, offs=offs, out_dtype=torch.float32)
            except Exception as error:  # noqa: BLE001 - report what this torch says
                print(f"| E={E} f={f} | {label} | float32 out unsupported: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]} | | | |")
                continue
            ref = gmm(a.t(), g, offs=offs).float()
            diff = ((out32 - ref).abs().max() / ref.abs().max()).item()
            t_cast = timed(lambda a=a, g=g, offs=offs: gmm(a.t(), g, offs=offs).float())
            t_32 = timed(lambda a=a, g=g, offs=offs: gmm(a.t(), g, offs=offs, out_dtype=torch.float32))
            print(f"| E={E} f={f} k={K} | {label} | {t_cast:.3f} | {t_32:.3f} | {t_cast - t_32:.3f} | {diff:.1e} |")
        # the forward cast of the float32 weights, for scale
        w32 = torch.randn(E, D, 2 * f, device="cuda")
        print(f"| E={E} f={f} | cast of the float32 gate+up weights to bf16 | {timed(lambda w32=w32: w32.to(torch.bfloat16)):.3f} | | | |")


if __name__ == "__main__":
    main()
