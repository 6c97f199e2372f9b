"""Experiment: would bf16 copies of PEER's tables pay for the two per-token passes?

The forward kernel and the per-token backward kernel each read the J = h·k retrieved
rows of u and of v for every token from the float32 tables. Reading bf16 copies halves
those bytes, but the copies cost a pass over both tables each step (read 4 bytes, write
2 per entry). Timed in one process at the issue's size (16,384 tokens, d = 1024, 1024²
experts) and at s120m-peer's (32,768 tokens, d = 768, 512² experts), h = 8, k = 16,
uniformly random retrievals: the two kernels on float32 tables, the same on bf16 copies,
and the cast of both tables. (The row-gradient pass is not included: it writes the
gradients in float32 either way.)

    python benchmarks/experiments/peer_bf16_tables.py > results/experiments/peer_backward/bf16_tables_h100.txt
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finemoe.kernels import peer_experts as kernels  # noqa: E402
from layer_benchmark import median_ms as shared_median_ms  # noqa: E402


median_ms = partial(shared_median_ms, warmup=3, repeats=10)


def shape(tokens: int, d: int, pool: int, J: int = 128) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, pool, (tokens, J), device="cuda")
    gates = torch.rand(tokens, J, device="cuda")
    tables32 = [torch.randn(pool, d, device="cuda") * 0.02 for _ in range(2)]
    tables16 = [t.to(torch.bfloat16) for t in tables32]
    sizes = kernels._sizes(d, J, "gelu")
    y = torch.empty_like(x)
    pre = torch.empty(tokens, J, device="cuda")
    dx, dgates, dpre = torch.empty_like(x), torch.empty_like(gates), torch.empty_like(pre)

    def forward(tables):
        return lambda: kernels._peer_forward_kernel[(tokens,)](x, idx, gates, tables[0], tables[1], y, pre, d, **sizes)

    def backward(tables):
        return lambda: kernels._peer_backward_kernel[(tokens,)](dy, idx, gates, pre, tables[0], tables[1], dx, dgates,
                                                                dpre, d, **sizes)

    rows = {
        "forward kernel, float32 tables": median_ms(forward(tables32)),
        "forward kernel, bf16 tables": median_ms(forward(tables16)),
        "per-token backward kernel, float32 tables": median_ms(backward(tables32)),
        "per-token backward kernel, bf16 tables": median_ms(backward(tables16)),
        "cast of both tables to bf16": median_ms(lambda: [t.to(torch.bfloat16) for t in tables32]),
    }
    row_bytes = tokens * J * d * 2 * 4  # u and v rows, float32
    print(f"== {tokens:,} tokens, d = {d}, {pool:,} experts, J = {J}: retrieved rows {row_bytes / 1e9:.1f} GB "
          "per pass in float32")
    for label, ms in rows.items():
        print(f"  {label:48s} {ms:8.3f} ms")
    saved = (rows["forward kernel, float32 tables"] + rows["per-token backward kernel, float32 tables"]
             - rows["forward kernel, bf16 tables"] - rows["per-token backward kernel, bf16 tables"])
    print(f"  saved by bf16 reads {saved:.3f} ms, against the cast {rows['cast of both tables to bf16']:.3f} ms")
    del tables32, tables16
    torch.cuda.empty_cache()


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    shape(16384, 1024, 1024**2)
    shape(32768, 768, 512**2)


if __name__ == "__main__":
    main()
