"""Experiment: two ways to run the small products around an FFN, compiled, forward +
backward under bf16 autocast, at the shapes of the s120m presets and the layer benchmark.

1. A SwiGLU MLP's gate and up projections as two ``nn.Linear`` products, or as one
   product against the two weights side by side (one wider GEMM forward; backward one
   input-gradient GEMM over both instead of two whose results are then added).
2. A routed layer's float32 router (E columns) and its float32 shared-expert mixing gate
   (2 columns) as two products of the normed input, or as one of E + 2 columns.

Prints a Markdown table of the GPU time per call in ms (the kernels' time under the
profiler: timed by the wall clock, these small compiled calls are bound by the host).

    python benchmarks/experiments/merged_projections.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finemoe.layers.common import RMSNorm, swiglu_hidden, swiglu_hidden_packed  # noqa: E402
from profile_layer import gpu_ms  # noqa: E402


class TwoProducts(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, h):
        x = self.norm(h)
        return self.down_proj(swiglu_hidden(self.gate_proj(x), self.up_proj(x)))


class OneProduct(TwoProducts):
    def forward(self, h):
        x = self.norm(h)
        gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        return self.down_proj(swiglu_hidden_packed(gate_up))


class RouterAndMix(nn.Module):
    """The float32 part of a gated routed layer: router softmax and the two-way mix."""

    def __init__(self, d: int, e: int, merged: bool):
        super().__init__()
        self.norm = RMSNorm(d)
        self.router = nn.Linear(d, e, bias=False)
        self.mix = nn.Linear(d, 2)
        self.merged = merged

    def forward(self, h):
        u = self.norm(h)
        with torch.autocast("cuda", enabled=False):
            if self.merged:
                bias = torch.cat([self.mix.bias.new_zeros(self.router.out_features), self.mix.bias])
                logits, mix_logits = F.linear(u, torch.cat([self.router.weight, self.mix.weight]), bias).split(
                    [self.router.out_features, 2], dim=-1)
            else:
                logits, mix_logits = F.linear(u, self.router.weight), F.linear(u, self.mix.weight, self.mix.bias)
            probs = torch.softmax(logits, -1)
            mix = torch.softmax(mix_logits, -1)
        weights, _ = probs.topk(2, dim=-1)
        return u * (weights.sum(-1, keepdim=True) * mix[:, :, :1] + mix[:, :, 1:])


def fwd_bwd(module, h, grad):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(h)
        out.backward(grad.to(out.dtype))
        h.grad = None
        for p in module.parameters():
            p.grad = None
    return step


def main() -> None:
    print("| part | tokens | d | width | two products ms | one product ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, d, f, what in [(32768, 768, 2048, "s120m dense"), (16384, 1024, 4096, "layer-benchmark dense"),
                          (32768, 768, 512, "s120m-cartesian shared"), (32768, 768, 1024, "s120m-moe shared"),
                          (16384, 1024, 1024, "layer cartesian shared"), (16384, 1024, 2048, "layer SMoE shared")]:
        h = torch.randn(n // 1024, 1024, d, device="cuda", requires_grad=True)
        grad = torch.randn_like(h)
        times = []
        for cls in (TwoProducts, OneProduct):
            torch.manual_seed(0)
            module = torch.compile(cls(d, f).cuda())
            times.append(gpu_ms(fwd_bwd(module, h, grad)))
        print(f"| SwiGLU ({what}) | {n} | {d} | {f} | {times[0]:.3f} | {times[1]:.3f} |")
    for n, d, e in [(32768, 768, 8), (16384, 1024, 8)]:
        h = torch.randn(n // 1024, 1024, d, device="cuda", requires_grad=True)
        grad = torch.randn_like(h)
        times = [gpu_ms(fwd_bwd(torch.compile(RouterAndMix(d, e, merged).cuda()), h, grad)) for merged in (False, True)]
        print(f"| router + mix gate, E={e} | {n} | {d} | {e}+2 | {times[0]:.3f} | {times[1]:.3f} |")


if __name__ == "__main__":
    main()
