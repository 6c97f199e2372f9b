"""Experiment: launch settings of Finedeep's SwiGLU-and-gate kernels
(``finemoe.kernels.finedeep_gate``) at sub-layer shapes of 16,384 tokens (the layer
benchmark's 2 × 4: K = 4 experts of f = 512, 4 × 4: f = 256; and wider tiles, K·f = 4,096
and 8,192): GPU time per call of the forward kernel for each warp count, and of the backward
kernel for each (tokens per program, warps), with its registers and spills, each checked
against the library's launch.

    python benchmarks/experiments/finedeep_gate_tiles.py [--layers] [--stages]

(The run at 9181b9d timed a two-pass backward over column chunks, since reverted.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_layer import gpu_ms

from finemoe.kernels import finedeep_gate as fg

SHAPES = ((4, 512), (4, 256), (8, 512), (16, 512))
FORWARD_WARPS = (2, 4, 8, 16)
BACKWARD = [(rows, warps, 1) for rows in (8, 16, 32) for warps in (1, 2, 4, 8, 16)]
if "--stages" in sys.argv:  # the row loop software-pipelined (loads of later tokens in flight)
    SHAPES = ((4, 512), (4, 256))
    FORWARD_WARPS = ()
    BACKWARD = [(16, warps, stages) for warps in (2, 4, 8) for stages in (1, 2, 3, 4)]


def _close(got, want) -> bool:
    return torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-3)


def main(tokens: int = 16384) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPU µs per call, {tokens} tokens")
    for K, f in SHAPES:
        torch.manual_seed(0)
        a, u, dout = (torch.randn(tokens, K * f, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        readout = torch.randn(K, f, device="cuda") * 0.05
        sizes = fg._sizes(K, f, False, True, 1.0)
        out, gates, scores = fg._swiglu_gate(a, u, readout, False, True, 1.0)
        dg_extra = torch.zeros(tokens, K, device="cuda")
        reference = fg._swiglu_gate_backward(dout, dg_extra, a, u, readout, scores, False, True, 1.0)
        print(f"\nK = {K}, f = {f} (library: forward {sizes['num_warps']} warps; backward "
              f"{fg._backward_launch(K, f)}, {fg._ROWS} tokens per program)")
        for warps in FORWARD_WARPS:
            settings = {**sizes, "num_warps": warps}
            o, g, z = torch.empty_like(a), torch.empty_like(gates), torch.empty_like(scores)

            def forward():
                return fg._forward_kernel[(tokens,)](a, u, readout, o, g, z, **settings)
            us = gpu_ms(forward, calls=20) * 1e3
            compiled = forward()
            print(f"forward  warps {warps:2d}: {us:7.1f} µs  close: {_close(o, out) and _close(g, gates)}  "
                  f"registers {compiled.n_regs}, spills {compiled.n_spills}", flush=True)
        for rows, warps, stages in BACKWARD:
            settings = {**sizes, "num_warps": warps, "ROWS": rows, "STAGES": stages}
            programs = -(-tokens // rows)
            da, du = torch.empty_like(a), torch.empty_like(u)
            partial = torch.empty(programs, K, f, device="cuda")

            def backward():
                return fg._backward_kernel[(programs,)](dout, a, u, readout, scores, dg_extra, da, du, partial, tokens,
                                                        **settings)
            us = gpu_ms(backward, calls=20) * 1e3
            compiled = backward()
            close = _close(da, reference[0]) and _close(du, reference[1]) and _close(partial.sum(0), reference[2])
            print(f"backward rows {rows:2d} warps {warps:2d} stages {stages}: {us:7.1f} µs  close: {close}  "
                  f"registers {compiled.n_regs}, spills {compiled.n_spills}", flush=True)


if __name__ == "__main__":
    main()
    if "--layers" in sys.argv:  # the layers with the library's settings, against dense, in this process
        from compiled_ab import compare

        print()
        compare(["dense", "finedeep 2x4", "finedeep 4x4"], {"library": lambda: lambda: None})
