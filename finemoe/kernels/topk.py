"""Top-k of short rows in registers: the routers' choice of k experts among E.

``torch.topk`` runs a radix select per row and then sorts the k results; for a router's
rows of a few experts that is most of a routed layer's routing time (32,768 tokens,
E = 8, k = 2 on an H100: 70 µs, against 2 µs for a kernel that reads the 1 MB of
probabilities once; benchmarks/experiments/routing_ops.py). Here one program takes a
block of rows, holds them in registers and pulls out the k largest by k rounds of
max-and-mask (``top_k_rounds``), best first, ties to the lower index. The product-key
retrieval's rows of up to 1,024 sub-key scores use ``top_k_by_groups``, whose rounds
cost O(G + C/G) for G column groups instead of O(C).

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
    def top_k_by_groups(row_ptrs, rmask, C, CP: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr):
        """The K largest of each of R rows of C entries in memory (``row_ptrs`` (R,) points
        at each row's first entry), best first, ties to the lower column, as
        ``top_k_rounds``: ``(values (R, KP), column (R, KP))``, padding -inf.

        For long rows (hundreds of entries) where ``top_k_rounds`` spends each of its K
        rounds on three passes over the whole (R, C) tile: the row is loaded once and cut
        into G groups of W = CP / G columns, and only each group's best remaining entry
        is held, (R, G). A round takes the best of those, then reloads the W entries of
        the group it came from (still in L1/L2) to find that group's next best: the
        entries after the one just taken in the order (value descending, column
        ascending), since a group gives up its entries in that order. A round costs
        O(G + W) instead of O(C)."""
        W: tl.constexpr = CP // G
        cols = tl.arange(0, CP)
        tile = tl.load(row_ptrs[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < C),
                       other=float("-inf"))
        groups = tl.reshape(tile, (tile.shape[0], G, W))
        group_best = tl.max(groups, axis=2)
        group_at = tl.min(tl.where(groups == group_best[:, :, None], tl.reshape(cols, (G, W))[None, :, :], CP),
                          axis=2)
        gcols, wcols, kcols = tl.arange(0, G), tl.arange(0, W), tl.arange(0, KP)
        values = tl.full((tile.shape[0], KP), float("-inf"), tl.float32)
        where = tl.zeros((tile.shape[0], KP), dtype=tl.int32)
        for t in range(K):
            best = tl.max(group_best, axis=1)
            at = tl.min(tl.where(group_best == best[:, None], group_at, CP), axis=1)
            values = tl.where(kcols[None, :] == t, best[:, None], values)
            where = tl.where(kcols[None, :] == t, at[:, None], where)
            # the next best of the group that gave it: its entries after (best, at)
            group = at // W
            gc = group[:, None] * W + wcols[None, :]
            v = tl.load(row_ptrs[:, None] + gc, mask=rmask[:, None] & (gc < C), other=float("-inf"))
            after = (v < best[:, None]) | ((v == best[:, None]) & (gc > at[:, None]))
            v = tl.where(after, v, float("-inf"))
            next_best = tl.max(v, axis=1)
            next_at = tl.min(tl.where(after & (v == next_best[:, None]), gc, CP), axis=1)
            here = gcols[None, :] == group[:, None]
            group_best = tl.where(here, next_best[:, None], group_best)
            group_at = tl.where(here, next_at[:, None], group_at)
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
