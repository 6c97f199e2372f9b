"""Helper of the A/B experiments on compiled layers: GPU time (profiler) per forward +
backward of layers named as in ``layer_benchmark.py``, each compiled afresh under every
variant, all in one process. A variant is a function that sets the code path up and
returns a function that restores it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import compiled, fwd_bwd, layer_configs
from profile_layer import gpu_ms

from finemoe.config import from_dict
from finemoe.layers import FFNConfig


def layer_inputs(d: int, tokens: int):
    """The input, cotangent and autocast of the layer benchmark's step at this size."""
    h = torch.randn(tokens // 512, 512, d, device="cuda", requires_grad=True)
    return h, torch.randn(h.shape, device="cuda"), torch.autocast("cuda", dtype=torch.bfloat16)


def fresh_layer(name: str, d: int, cuda_graphs: bool = False):
    """Layer ``name`` of ``layer_benchmark.py`` built afresh (seed 0) and compiled afresh."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    return compiled(from_dict(FFNConfig, dict(layer_configs(d)[name])).build(d).cuda().train(), cuda_graphs)


def compare(names, variants: dict[str, Callable[[], Callable[[], None]]], d: int = 1024, tokens: int = 16384) -> None:
    """Print a Markdown table: one row per layer, one column per variant (GPU ms)."""
    h, cotangent, autocast = layer_inputs(d, tokens)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPU ms per forward + backward (compiled), "
          f"{tokens} tokens, d = {d}")
    print("| layer | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for name in names:
        times = []
        for setup in variants.values():
            restore = setup()
            try:
                layer = fresh_layer(name, d)
                times.append(gpu_ms(fwd_bwd(layer, h, cotangent, autocast), calls=10))
            finally:
                restore()
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in times) + " |", flush=True)
