"""Experiment: how close do Triton GEMMs come to cuBLAS / CUTLASS on this GPU?

Every fused-GEMM lever left for the routed layers (a gather in a grouped GEMM's prologue,
the SwiGLU or Finedeep's gate in an epilogue, float32 weight gradients written by the
GEMM) needs a Triton GEMM about as fast as the library GEMM it replaces. This times
Inductor's best Triton template (``max_autotune``, Triton backend only, persistent TMA
templates on where this torch has them) against torch's own product, at the shapes of
the layer benchmark:

- the dense FFN's nine products (d = 1024, 16,384 tokens, F = 4096; gate and up packed);
- the grouped products of moe E = 8, k = 2 (torch's CUTLASS grouped GEMM against
  Inductor's Triton grouped template, where this torch has one);
- the routed gather ``x[token]`` followed by the grouped product, compiled (Inductor may
  fuse the gather into the template's prologue) against eager gather + grouped GEMM.

GPU times: CUDA events, median of 30 (``layer_benchmark.median_ms``).

    python benchmarks/experiments/triton_gemm_ceiling.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import median_ms

timed = partial(median_ms, warmup=5, repeats=30)


def _inductor_options() -> dict:
    import torch._inductor.config as inductor_config

    wanted = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON",
              "triton.enable_persistent_tma_matmul": True, "prologue_fusion": True, "epilogue_fusion": True}
    options = {}
    for key, value in wanted.items():
        owner, _, leaf = key.rpartition(".")
        node = getattr(inductor_config, owner) if owner else inductor_config
        if hasattr(node, leaf):
            options[key] = value
        else:
            print(f"(this torch has no inductor option {key})")
    return options


def _row(label: str, flops: float, library_ms: float, triton_ms: float, error: float) -> None:
    print(f"| {label} | {library_ms:.3f} | {flops / library_ms / 1e9:.0f} | {triton_ms:.3f} | "
          f"{flops / triton_ms / 1e9:.0f} | {library_ms / triton_ms:.2f} | {error:.1e} |")


def _compare(label: str, fn, args, flops: float, options: dict) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, options=options, dynamic=False)
    try:
        out_c = compiled(*args)
    except Exception as error:  # noqa: BLE001 - report what this torch does
        print(f"| {label} | failed to compile: {type(error).__name__}: {str(error).splitlines()[0][:120]} |||||")
        return
    out = fn(*args)
    err = ((out_c.float() - out.float()).abs().max() / out.float().abs().max()).item()
    _row(label, flops, timed(lambda: fn(*args)), timed(lambda: compiled(*args)), err)


def main() -> None:
    torch.manual_seed(0)
    options = _inductor_options()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; inductor options {options}\n")
    print("| product | library ms | TFLOP/s | best Triton ms | TFLOP/s | library / Triton | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    N, D, F = 16384, 1024, 4096
    dense = [  # (label, m, k, n, transpose a, transpose b)
        ("dense fwd x·W_gu (N×D · D×2F)", N, D, 2 * F),
        ("dense fwd a·W_d (N×F · F×D)", N, F, D),
        ("dense bwd dy·W_dᵀ (N×D · D×F)", N, D, F),
        ("dense bwd dW_d = aᵀ·dy (F×N · N×D)", F, N, D),
        ("dense bwd dx = dgu·W_guᵀ (N×2F · 2F×D)", N, 2 * F, D),
        ("dense bwd dW_gu = xᵀ·dgu (D×N · N×2F)", D, N, 2 * F),
    ]
    for label, m, k, n in dense:
        a, b = torch.randn(m, k, **bf16), torch.randn(k, n, **bf16)
        _compare(label, torch.mm, (a, b), 2 * m * k * n, options)

    E, K, f = 8, 2, 2048
    S = N * K
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (S // E)
    x = torch.randn(N, D, **bf16)
    token = torch.randint(0, N, (S,), device="cuda")
    w_gu = torch.randn(E, D, 2 * f, **bf16)
    w_d = torch.randn(E, f, D, **bf16)
    xs = x[token]
    hidden = torch.randn(S, f, **bf16)
    gmm = torch._grouped_mm
    _compare("moe E=8 fwd x_s·W_gu (grouped)", lambda a, w: gmm(a, w, offs=offs), (xs, w_gu), 2 * S * D * 2 * f,
             options)
    _compare("moe E=8 fwd a·W_d (grouped)", lambda a, w: gmm(a, w, offs=offs), (hidden, w_d), 2 * S * f * D, options)
    _compare("moe E=8 gather x[token] + grouped x_s·W_gu", lambda a, t, w: gmm(a[t], w, offs=offs), (x, token, w_gu),
             2 * S * D * 2 * f, options)


if __name__ == "__main__":
    main()
