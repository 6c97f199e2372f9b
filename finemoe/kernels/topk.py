"""Top-k of short rows in registers: the routers' choice of k experts among E.

``torch.topk`` runs a radix select per row and then sorts the k results; for a router's
rows of a few experts that is most of a routed layer's routing time (32,768 tokens,
E = 8, k = 2 on an H100: 70 µs, against 2 µs for a kernel that reads the 1 MB of
probabilities once; benchmarks/experiments/routing_ops.py). Here one program takes a
block of rows, holds them in registers and pulls out the k largest by k rounds of
max-and-mask (``top_k_rounds``, also the product-key retrieval's), best first, ties to
the lower index.

Only the indices come out of the kernel: the router's weights are gathered from the
probabilities in PyTorch (``probs.gather(-1, idx)``), so their gradient is autograd's
and the operator needs none.

Kernel → launcher → ``torch.library`` operator (``finemoe.kernels.op``). Tested against
``torch.topk`` on the CPU under ``TRITON_INTERPRET=1``.

Shapes: M rows of C entries, k kept (padded to KP), C padded to CP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.op import fake, kernel_op, launch
from finemoe.kernels.swiglu import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["row_topk_indices", "row_topk_supported"]

_MAX_COLUMNS = 256  # a (ROWS, C) float32 tile in registers
_ROWS = 32  # rows per program (E = 8 and 64 on an H100: 32 and 64 rows within 5% of each other)


def row_topk_supported(x: Tensor, k: int) -> bool:
    """Whether ``row_topk_indices`` runs the kernel for ``x`` (rows of at most 256 entries
    on a GPU with Triton); otherwise callers use ``torch.topk``."""
    return triton_kernels_available(x) and x.dim() == 2 and x.shape[1] <= _MAX_COLUMNS and 0 < k <= x.shape[1]


if triton is not None:

    @triton.jit
    def top_k_rounds(scores, cols, K: tl.constexpr, KP: tl.constexpr):
        """The K largest of each row of ``scores`` (R, C), best first, by K rounds of
        max-and-mask: ``(values (R, KP), column (R, KP))``; padding columns hold -inf."""
        kcols = tl.arange(0, KP)
        values = tl.full((scores.shape[0], KP), float("-inf"), tl.float32)
        where = tl.zeros((scores.shape[0], KP), dtype=tl.int32)
        for t in range(K):  # a loop, not unrolled: k rounds over an (R, S) tile compile slowly unrolled
            best = tl.max(scores, axis=1)
            # the lowest column holding the maximum (ties to the lower index)
            at = tl.min(tl.where(scores == best[:, None], cols[None, :], scores.shape[1]), axis=1)
            values = tl.where(kcols[None, :] == t, best[:, None], values)
            where = tl.where(kcols[None, :] == t, at[:, None], where)
            scores = tl.where(cols[None, :] == at[:, None], float("-inf"), scores)
        return values, where

    @triton.jit
    def _row_topk_kernel(x_ptr, idx_ptr, M, C, K: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr,
                         ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        cols = tl.arange(0, CP)
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & (cols[None, :] < C),
                    other=float("-inf")).to(tl.float32)
        _, where = top_k_rounds(x, cols, K, KP)
        kcols = tl.arange(0, KP)
        # a row holding NaN matches no maximum: keep its index in range (torch.topk ranks
        # NaN first; the loss is not finite either way, and the trainer stops on it)
        where = tl.minimum(where, C - 1)
        tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], where.to(tl.int64),
                 mask=rmask[:, None] & (kcols[None, :] < K))


@kernel_op("finemoe::row_topk_indices", mutates_args=())
def _row_topk_indices(x_MC: Tensor, k: int) -> Tensor:
    x_MC = x_MC.contiguous()
    M, C = x_MC.shape
    idx_Mk = torch.empty(M, k, dtype=torch.int64, device=x_MC.device)
    if M:
        launch(_row_topk_kernel)[(triton.cdiv(M, _ROWS),)](
            x_MC, idx_Mk, M, C, K=k, KP=max(2, triton.next_power_of_2(k)), CP=max(16, triton.next_power_of_2(C)),
            ROWS=_ROWS, num_warps=4)
    return idx_Mk


@fake(_row_topk_indices)
def _(x_MC: Tensor, k: int) -> Tensor:
    return x_MC.new_empty(x_MC.shape[0], k, dtype=torch.int64)


def row_topk_indices(x_MC: Tensor, k: int) -> Tensor:
    """The columns of each row's ``k`` largest entries, ``(M, k)`` int64, best first, ties
    to the lower column; ``torch.topk``'s indices where the kernel does not run."""
    if row_topk_supported(x_MC, k):
        return _row_topk_indices(x_MC.detach(), k)
    return x_MC.detach().topk(k, dim=-1).indices
