"""Experiment: the small routing operations of a token-choice layer, ways to run each,
GPU time per call (kernels under the profiler), eager and compiled, at the s120m shapes
(32,768 tokens; E = 8, k = 2 and E = 64, k = 8).

- top-k of each token's E probabilities: ``torch.topk``, ``topk(sorted=False)``, a sort
  of the row (``torch.sort(stable=True)``, first k), finemoe's register kernel;
- the slots' order by expert: ``argsort`` of the int64 expert ids, of int16 / uint8 ids
  (fewer radix passes);
- tokens per expert: ``scatter_add_`` of ones, a one-hot compare-and-sum, and
  ``searchsorted`` on the sorted ids.

    python benchmarks/experiments/routing_ops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finemoe.kernels.topk import row_topk_indices  # noqa: E402
from profile_layer import gpu_ms  # noqa: E402


def main() -> None:
    N = 32768
    print("| operation | E | k | eager ms | compiled ms |")
    print("|---|---:|---:|---:|---:|")
    for E, k in [(8, 2), (64, 8)]:
        probs = torch.softmax(torch.randn(N, E, device="cuda"), -1)
        idx = probs.topk(k, dim=-1).indices.reshape(-1)
        keys_sorted = idx.sort(stable=True).values
        experts = torch.arange(E, device="cuda")
        ops = {
            "topk": lambda p: p.topk(k, dim=-1),
            "topk(sorted=False)": lambda p: p.topk(k, dim=-1, sorted=False),
            "sort, first k": lambda p: [t[:, :k] for t in p.sort(dim=-1, descending=True, stable=True)],
            "finemoe.kernels.topk (indices)": lambda p: row_topk_indices(p, k),
        }
        for name, op in ops.items():
            row = [gpu_ms(lambda: op(probs)), gpu_ms(lambda c=torch.compile(op): c(probs))]
            print(f"| {name} | {E} | {k} | {row[0]:.4f} | {row[1]:.4f} |")
        orders = {
            "argsort int64": lambda i: torch.argsort(i, stable=True),
            "argsort int16": lambda i: torch.argsort(i.to(torch.int16), stable=True),
            "argsort uint8": lambda i: torch.argsort(i.to(torch.uint8), stable=True),
        }
        for name, op in orders.items():
            row = [gpu_ms(lambda: op(idx)), gpu_ms(lambda c=torch.compile(op): c(idx))]
            print(f"| {name} ({idx.numel()} slots) | {E} | {k} | {row[0]:.4f} | {row[1]:.4f} |")
        counts = {
            "count: scatter_add_": lambda i: torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(
                0, i, torch.ones_like(i)),
            "count: one-hot compare-and-sum": lambda i: (i.unsqueeze(-1) == experts).sum(0),
            "count: searchsorted on sorted ids": lambda s: torch.diff(
                torch.searchsorted(s, torch.arange(E + 1, device="cuda"))),
        }
        for name, op in counts.items():
            arg = keys_sorted if "searchsorted" in name else idx
            row = [gpu_ms(lambda: op(arg)), gpu_ms(lambda c=torch.compile(op): c(arg))]
            print(f"| {name} | {E} | {k} | {row[0]:.4f} | {row[1]:.4f} |")


if __name__ == "__main__":
    main()
