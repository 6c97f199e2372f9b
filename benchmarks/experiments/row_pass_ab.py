"""Experiment: PEER's per-row gradient pass (``_row_gradients``) of the library against
an earlier version of ``finemoe/kernels/peer_experts.py``, in one process, on three
retrieval patterns: uniform at issue 12's size (16,384 tokens, d = 1024, 1024² rows,
J = 128: ~2 pairs a row), uniform at s120m-peer's shape (32,768 tokens, d = 768, 512²
rows: ~16 a row) and skewed at that shape (a few thousand rows, the longest holding a
million pairs, as a frequent token's retrievals do). Prints whether both write the same
gradients and their GPU times (median of 20, twice each, interleaved).

    git show dfead6e:finemoe/kernels/peer_experts.py > .cache/old_peer_experts.py
    python benchmarks/experiments/row_pass_ab.py --previous .cache/old_peer_experts.py
    python benchmarks/experiments/row_pass_ab.py --previous ... --sweep   # + the short rows' tiles

(The earlier module registers its operators under the library's names when imported;
only its ``_row_gradients``, a plain function, is called here.)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import median_ms  # noqa: E402

from finemoe.kernels import peer_experts as library  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--previous", required=True, help="a copy of an earlier finemoe/kernels/peer_experts.py")
    parser.add_argument("--sweep", action="store_true", help="also the library with other tiles for its short rows")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("previous_peer_experts", args.previous)
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    print(torch.cuda.get_device_name(), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, N, D, P, J, skew in (("issue 12 size, uniform", 16384, 1024, 1024**2, 128, False),
                                   ("s120m-peer shape, uniform", 32768, 768, 512**2, 128, False),
                                   ("s120m-peer shape, skewed (Zipf-like)", 32768, 768, 512**2, 128, True)):
        x = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        dy = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        if skew:  # most pairs on a few hundred rows, the longest of about a million
            idx = (torch.rand(N, J, device="cuda", generator=g) ** 6 * 3000).long()
        else:
            idx = torch.randint(0, P, (N, J), device="cuda", generator=g)
        gates = torch.rand(N, J, device="cuda", generator=g)
        pre = torch.randn(N, J, device="cuda", generator=g)
        dpre = torch.randn(N, J, device="cuda", generator=g) * 0.01
        rows_sorted, order = idx.reshape(-1).sort(stable=True)
        offsets = torch.searchsorted(rows_sorted, torch.arange(P + 1, device="cuda", dtype=rows_sorted.dtype))
        outs = {}
        for label, module in (("previous", previous), ("library", library)):
            d_in = torch.full((P, D), float("nan"), device="cuda")  # every row must be written
            d_out = torch.full((P, D), float("nan"), device="cuda")
            module._row_gradients(order, offsets, x, dy, gates, pre, dpre, d_in, d_out, True, 0)
            outs[label] = (d_in, d_out)
        same = all(torch.equal(a, b) for a, b in zip(outs["previous"], outs["library"]))
        d_in, d_out = outs["library"]
        counts = offsets[1:] - offsets[:-1]
        times = {}
        for label, module in (("previous", previous), ("library", library), ("previous again", previous),
                              ("library again", library)):
            times[label] = median_ms(lambda m=module: m._row_gradients(order, offsets, x, dy, gates, pre, dpre, d_in,
                                                                       d_out, True, 0), warmup=3, repeats=20)
        print(f"{name}: {int((counts > 0).sum()):,} of {P:,} rows used, longest {int(counts.max()):,} pairs; "
              f"identical {same}; " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()), flush=True)
        if args.sweep:
            kept = library._SHORT_BLOCK_D, library._SHORT_WARPS
            for block_d, warps in ((256, 1), (256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8)):
                library._SHORT_BLOCK_D, library._SHORT_WARPS = block_d, warps
                ms = median_ms(lambda: library._row_gradients(order, offsets, x, dy, gates, pre, dpre, d_in, d_out,
                                                              True, 0), warmup=3, repeats=20)
                print(f"    short rows {block_d} columns, {warps} warps: {ms:.3f} ms", flush=True)
            library._SHORT_BLOCK_D, library._SHORT_WARPS = kept


if __name__ == "__main__":
    main()
