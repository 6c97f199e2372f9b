"""Experiment: float32 products by cuBLAS float32 against a split-bf16 GEMM at float32
accuracy, at the shapes of PEER/PKM's retrieval (not in the library: it did not pay at
s120m-peer's shapes, benchmarks/NOTES.md).

The split: each float32 operand is cut exactly into three bf16 pieces,
``a = a0 + a1 + a2`` with ``a0 = bf16(a)``, ``a1 = bf16(a - a0)``, ``a2 = bf16(a - a0 - a1)``
(each difference exact in float32; 3 × 8 bits cover float32's 24), and ``a·b`` is the sum
of the six products above 2⁻²⁴ of ``a0 b0`` (``a2b0 + a1b1 + a0b2 + a1b0 + a0b1 + a0b0``;
the dropped ones are below 2⁻²⁶ of it). A bf16 × bf16 product is exact in float32 and the
tensor cores accumulate in float32, so one bf16 GEMM over the pieces laid side by side
along the contracted dimension (6K long, smallest terms first; a Triton kernel writes
them in one pass) and ``torch.mm(..., out_dtype=torch.float32)`` give float32's accuracy
where the contraction is short (the idea of cuBLAS's BF16x9 emulation on newer GPUs).

For each product: the time of each (CUDA events, median of 20), and the error of each
against float64 (largest absolute difference over the largest absolute value of the
float64 product), TF32 alongside for scale. s120m-peer (32,768 tokens, d = 768, 8 heads,
key width 128, 512 sub-keys) and issue 12's size (16,384 tokens, d = 1024, key width 256,
1,024 sub-keys).

    python benchmarks/experiments/float32_products.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layer_benchmark import median_ms

timed = partial(median_ms, warmup=3, repeats=20)

# (piece of a, piece of b) of the six products, smallest first. Piece 0 is the high one.
_PAIRS = ((2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0))
_A_PIECES = tuple(a for a, _ in _PAIRS)
_B_PIECES = tuple(b for _, b in _PAIRS)
_BLOCK = 1024


@triton.jit
def _piece(hi, mid, lo, WHICH: tl.constexpr):
    if WHICH == 0:
        return hi
    elif WHICH == 1:
        return mid
    else:
        return lo


@triton.jit
def _split_kernel(x_ptr, out_ptr, R, C, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                  P4: tl.constexpr, P5: tl.constexpr, ALONG_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """x (R, C) float32 → its six bf16 pieces P_i, stacked along the rows (6R, C) or side
    by side (R, 6C)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R * C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)  # exact (Sterbenz)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    if ALONG_ROWS:
        step = R * C
        target = offs
    else:
        row = offs // C
        step = C
        target = row * 6 * C + (offs - row * C)
    tl.store(out_ptr + target, _piece(hi, mid, lo, P0), mask=mask)
    tl.store(out_ptr + target + step, _piece(hi, mid, lo, P1), mask=mask)
    tl.store(out_ptr + target + 2 * step, _piece(hi, mid, lo, P2), mask=mask)
    tl.store(out_ptr + target + 3 * step, _piece(hi, mid, lo, P3), mask=mask)
    tl.store(out_ptr + target + 4 * step, _piece(hi, mid, lo, P4), mask=mask)
    tl.store(out_ptr + target + 5 * step, _piece(hi, mid, lo, P5), mask=mask)


def split_to_bf16(x: torch.Tensor, pieces: tuple[int, ...], along_rows: bool) -> torch.Tensor:
    x = x.contiguous()
    R, C = x.shape
    out = torch.empty((6 * R, C) if along_rows else (R, 6 * C), dtype=torch.bfloat16, device=x.device)
    _split_kernel[(triton.cdiv(R * C, _BLOCK),)](x, out, R, C, *pieces, ALONG_ROWS=along_rows, BLOCK=_BLOCK)
    return out


def _split_operand(x: torch.Tensor, pieces: tuple[int, ...], contracted_dim: int) -> torch.Tensor:
    """An operand's pieces along its contracted dimension (a transposed view is split as
    its contiguous transpose, then transposed back)."""
    if x.t().is_contiguous() and not x.is_contiguous():
        return split_to_bf16(x.t(), pieces, along_rows=contracted_dim == 1).t()
    return split_to_bf16(x, pieces, along_rows=contracted_dim == 0)


def float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (float32) by one bf16 GEMM over the six pieces."""
    a6 = _split_operand(a, _A_PIECES, contracted_dim=1)  # (M, 6K)
    b6 = _split_operand(b, _B_PIECES, contracted_dim=0)  # (6K, N)
    return torch.mm(a6, b6, out_dtype=torch.float32)


def _error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


def _shapes():
    """(name, a, b) with the layouts the layers use (transposed views where they have them)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    for tag, tokens, d, width, sub_keys, half in (("s120m-peer", 32768, 768, 1024, 512, 64),
                                                   ("issue size", 16384, 1024, 2048, 1024, 128)):
        x, w, dq = rand(tokens, d), rand(width, d) * d**-0.5, rand(tokens, width)
        q, keys = rand(tokens * width // (2 * half), half), rand(sub_keys, half) * half**-0.5
        yield f"{tag} query forward x Wᵀ", x, w.t()
        yield f"{tag} query input gradient dq W", dq, w
        yield f"{tag} query weight gradient dqᵀ x", dq.t(), x
        yield f"{tag} sub-key scores q Cᵀ", q, keys.t()


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| product | M × K × N | cuBLAS float32 ms | split bf16 ms | TF32 ms | error float32 | split | TF32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, a, b in _shapes():
        exact = a.double() @ b.double()
        plain = a @ b
        split = float32_mm(a, b)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = a @ b
        t_tf32 = timed(lambda a=a, b=b: a @ b)
        torch.backends.cuda.matmul.allow_tf32 = False
        t_plain, t_split = timed(lambda a=a, b=b: a @ b), timed(lambda a=a, b=b: float32_mm(a, b))
        print(f"| {name} | {a.shape[0]} × {a.shape[1]} × {b.shape[1]} | {t_plain:.3f} | {t_split:.3f} | {t_tf32:.3f} "
              f"| {_error(plain, exact):.1e} | {_error(split, exact):.1e} | {_error(tf32, exact):.1e} |", flush=True)
        del exact


if __name__ == "__main__":
    main()
