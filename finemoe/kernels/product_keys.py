"""Product-key retrieval (Lample et al. 2019 §3.2; PEER eq. 3-4): the two top-k over the
sub-key scores and the top-k of the k² sums in one kernel.

For a query q = [q¹ ; q²] (rows are (token, head) pairs) and sub-key tables C, C' of S
rows each, the key of expert (a, b) is [c_a ; c'_b], so

    score(a, b) = q¹ · c_a + q² · c'_b

and the k best sums have both parts among the top-k of their half. The eager reference
(``finemoe.layers.routing.product_key_topk``) writes the two ``(N·H, S)`` score matrices
(512 MB each in float32 at 16,384 tokens, 8 heads, S = 1024) and runs a radix top-k over
them: 10 ms of its 21 ms forward + backward at that size on an H100, of which the
score products are 2 × 0.9 ms. Here the score products stay cuBLAS float32 matrix
products (router math stays float32; Triton's IEEE float32 ``tl.dot`` in the kernel
measured ten times slower: ``benchmarks/experiments/product_key_topk_ab.py``), and one
kernel takes R query rows: it loads the ``(R, S)`` scores of one half once and pulls out
the k best by k rounds over the best of each of 32 column groups, reloading only the
group a round took from (``finemoe.kernels.topk.top_k_by_groups``; ties to the lower
index), does the same for the other half, then takes the k best pair sums by a frontier
over the two sorted lists (O(k) a round, nothing of size k²). The score matrices are
written once and read once (a round's reload mostly hits the cache); nothing of size
``(N·H, k²)`` or the radix top-k's passes is written, and only the ``(N·H, k)`` scores
and indices are kept.

Backward, with ``ds`` the gradient of the k retrieved scores and a, b the two halves of
each retrieved index, two kernels and no ``(N·H, S)`` tensor (the eager backward
scatters ``ds`` into two dense ones and runs four float32 matrix products over them):

    dq¹_r = Σ_k ds_rk c_{a_rk}                 one program per block of query rows
    dc_s  = Σ_{(r,k): a_rk = s} ds_rk q¹_r     over the pairs sorted by sub-key (stable:
                                               fixed order), each sub-key's range in 16
                                               parts summed after, in a fixed order

and likewise for q², c'. Deterministic, no atomic adds.

Kernel → launcher → ``torch.library.custom_op`` (fake implementation) → autograd.
Tested against the eager reference and brute force over all S² keys on the CPU under
``TRITON_INTERPRET=1``.

Shapes: M = N·H query rows, Q key width (two halves of Q/2), S sub-keys per table
(padded to SP, a power of two), k retrieved (padded to KP).
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.grouping import group_by_index
from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl

    from finemoe.kernels.topk import top_k_by_groups
except ImportError:
    triton = None

__all__ = ["fused_product_key_topk", "fused_product_key_topk_supported"]

_TOPK_ROWS = 8  # query rows per program of the top-k kernel, on 4 warps, and column groups per
_TOPK_WARPS = 4  # sub-key score row (top_k_by_groups): within 7% of the best of 1-8 rows, 1-4 warps,
_TOPK_GROUPS = 32  # 16-64 groups at both s120m-peer's and issue 12's sizes (H100; benchmarks/NOTES.md)
_ROWS = 8  # query rows per program of the query-gradient kernel
_PAIRS = 64  # (row, slot) pairs per step of the sub-key gradient pass
_SPLITS = 16  # programs per sub-key in that pass (partial sums added after)
_MAX_SUB_KEYS = 1024  # an (R, S) float32 tile in registers; S = 1024 is N = 1024² experts
_MAX_K = 32  # the largest k tested on the GPU (PKM's); the pair frontier holds (R, k) vectors


def fused_product_key_topk_supported(sub_keys: int, k: int) -> bool:
    """Triton installed, the tables small enough for one register tile per half, and k
    within the tested range."""
    return triton is not None and sub_keys <= _MAX_SUB_KEYS and k <= _MAX_K


if triton is not None:

    @triton.jit
    def _product_key_topk_kernel(s1_ptr, s2_ptr, scores_ptr, idx_ptr, M, S, K: tl.constexpr, KP: tl.constexpr,
                                 SP: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        top1, a = top_k_by_groups(s1_ptr + rows * S, rmask, S, SP, G, K, KP)
        top2, b = top_k_by_groups(s2_ptr + rows * S, rmask, S, SP, G, K, KP)
        # The k best pair sums top1[i] + top2[j] of the two sorted lists, ties to the lower
        # p = i·KP + j, by a frontier: for each i, the next j not yet taken (sums fall as j
        # grows, so a row i gives up its pairs in order j = 0, 1, ...). A round takes the
        # best frontier sum (the lowest i among equals: any tied pair of a lower p sits
        # on its row's frontier, since that row's frontier sum is at least its own) and
        # moves that row's frontier one step: O(k) a round, nothing of size k².
        kcols = tl.arange(0, KP)
        top2_first = tl.max(tl.where(kcols[None, :] == 0, top2, float("-inf")), axis=1)
        frontier = top1 + top2_first[:, None]  # (ROWS, KP): row i's next sum; -inf past k
        next_j = tl.zeros((ROWS, KP), dtype=tl.int32)
        best = tl.full((ROWS, KP), float("-inf"), tl.float32)
        out_a = tl.zeros((ROWS, KP), dtype=tl.int32)
        out_b = tl.zeros((ROWS, KP), dtype=tl.int32)
        for t in range(K):
            top = tl.max(frontier, axis=1)
            i = tl.min(tl.where(frontier == top[:, None], kcols[None, :], KP), axis=1)
            row_i = kcols[None, :] == i[:, None]
            j = tl.sum(tl.where(row_i, next_j, 0), axis=1)
            best = tl.where(kcols[None, :] == t, top[:, None], best)
            out_a = tl.where(kcols[None, :] == t, tl.sum(tl.where(row_i, a, 0), axis=1)[:, None], out_a)
            col_j = kcols[None, :] == j[:, None]
            out_b = tl.where(kcols[None, :] == t, tl.sum(tl.where(col_j, b, 0), axis=1)[:, None], out_b)
            after_j = tl.max(tl.where(kcols[None, :] == j[:, None] + 1, top2, float("-inf")), axis=1)
            frontier = tl.where(row_i, top1 + after_j[:, None], frontier)
            next_j = tl.where(row_i, next_j + 1, next_j)
        kmask = rmask[:, None] & (kcols[None, :] < K)
        out = rows[:, None] * K + kcols[None, :]
        tl.store(scores_ptr + out, best, mask=kmask)
        tl.store(idx_ptr + out, out_a.to(tl.int64) * S + out_b.to(tl.int64), mask=kmask)

    @triton.jit
    def _query_grad_kernel(ds_ptr, idx_ptr, keys1_ptr, keys2_ptr, dq_ptr, M, S, Q,
                           HALF: tl.constexpr, HP: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr):
        """dq¹_r = Σ_k ds_rk c_{a_rk} and dq²_r = Σ_k ds_rk c'_{b_rk} for ROWS query rows
        (the sub-key tables are small enough to stay in L2)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        cols = tl.arange(0, HP)
        tile = rmask[:, None] & (cols[None, :] < HALF)
        dq1 = tl.zeros((ROWS, HP), dtype=tl.float32)
        dq2 = tl.zeros((ROWS, HP), dtype=tl.float32)
        for k in range(K):
            ds = tl.load(ds_ptr + rows * K + k, mask=rmask, other=0.0)
            expert = tl.load(idx_ptr + rows * K + k, mask=rmask, other=0)
            a, b = expert // S, expert % S
            dq1 += ds[:, None] * tl.load(keys1_ptr + a[:, None] * HALF + cols[None, :], mask=tile, other=0.0)
            dq2 += ds[:, None] * tl.load(keys2_ptr + b[:, None] * HALF + cols[None, :], mask=tile, other=0.0)
        tl.store(dq_ptr + rows[:, None] * Q + cols[None, :], dq1, mask=tile)
        tl.store(dq_ptr + rows[:, None] * Q + HALF + cols[None, :], dq2, mask=tile)

    @triton.jit
    def _sub_key_grad_kernel(order_ptr, offsets_ptr, ds_ptr, q_ptr, partial_ptr, Q, half_offset, S,
                             HALF: tl.constexpr, HP: tl.constexpr, K: tl.constexpr, BLOCK_P: tl.constexpr,
                             SPLITS: tl.constexpr):
        """Part ``split`` of dc_s = Σ_{(r,k) that used sub-key s} ds_rk q_r (one half): the
        pairs sorted by sub-key, each sub-key's range cut into SPLITS consecutive parts (a
        sub-key is used by thousands of pairs: one program each left the GPU idle), walked
        BLOCK_P pairs at a time; partial sums written to ``partial[split, s]``."""
        sub = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        cols = tl.arange(0, HP)
        acc = tl.zeros((HP,), dtype=tl.float32)
        start = tl.load(offsets_ptr + sub)
        stop = tl.load(offsets_ptr + sub + 1)
        part = tl.cdiv(stop - start, SPLITS)
        o = start + split * part
        end = tl.minimum(stop, o + part)
        while o < end:  # runtime bounds: a while loop (also under TRITON_INTERPRET=1)
            pos = o + tl.arange(0, BLOCK_P)
            pmask = pos < end
            pair = tl.load(order_ptr + pos, mask=pmask, other=0)
            ds = tl.load(ds_ptr + pair, mask=pmask, other=0.0)
            q = tl.load(q_ptr + (pair // K)[:, None] * Q + half_offset + cols[None, :],
                        mask=pmask[:, None] & (cols[None, :] < HALF), other=0.0)
            acc += tl.sum(ds[:, None] * q, axis=0)
            o += BLOCK_P
        tl.store(partial_ptr + (split * S + sub) * HALF + cols, acc, mask=cols < HALF)


def _launch(q_MQ: Tensor, keys_1: Tensor, keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    M = q_MQ.shape[0]
    S, half = keys_1.shape
    scores = torch.empty(M, k, dtype=torch.float32, device=q_MQ.device)
    idx = torch.empty(M, k, dtype=torch.int64, device=q_MQ.device)
    if M:
        # the two (M, S) score matrices by cuBLAS in float32 (Triton's IEEE float32 dot
        # measured ten times slower); the kernel reads each once
        s1, s2 = q_MQ[:, :half] @ keys_1.t(), q_MQ[:, half:] @ keys_2.t()
        sp = max(16, triton.next_power_of_2(S))
        launch(_product_key_topk_kernel)[(triton.cdiv(M, _TOPK_ROWS),)](
            s1, s2, scores, idx, M, S, K=k, KP=max(2, triton.next_power_of_2(k)), SP=sp,
            G=min(sp, _TOPK_GROUPS), ROWS=_TOPK_ROWS, num_warps=_TOPK_WARPS)
    return scores, idx


@kernel_op("finemoe::product_key_topk", mutates_args=())
def _product_key_topk(q_MQ: Tensor, keys_1: Tensor, keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return _launch(q_MQ.float().contiguous(), keys_1.float().contiguous(), keys_2.float().contiguous(), k)


@fake(_product_key_topk)
def _(q_MQ, keys_1, keys_2, k):
    M = q_MQ.shape[0]
    return q_MQ.new_empty(M, k, dtype=torch.float32), q_MQ.new_empty(M, k, dtype=torch.int64)


def _setup_context(ctx, inputs, output) -> None:
    q_MQ, keys_1, keys_2, _ = inputs
    ctx.save_for_backward(q_MQ, keys_1, keys_2, output[1])


@kernel_op("finemoe::product_key_topk_backward", mutates_args=())
def _product_key_topk_backward(dscores_Mk: Tensor, q_MQ: Tensor, keys_1: Tensor, keys_2: Tensor,
                               idx_Mk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q_MQ, keys_1, keys_2 = q_MQ.float().contiguous(), keys_1.float().contiguous(), keys_2.float().contiguous()
    dscores_Mk = dscores_Mk.float().contiguous()
    (M, Q), (S, half), k = q_MQ.shape, keys_1.shape, idx_Mk.shape[1]
    hp = max(16, triton.next_power_of_2(half))
    dq_MQ = torch.empty_like(q_MQ)  # every entry written
    # per half, SPLITS partial sums of every sub-key (zero if unused), added in a fixed order;
    # one tensor per half, not two views of one: Inductor's copy of a view that a kernel
    # writes read past the end of its buffer (pytorch/pytorch#161115; an illegal memory
    # access in compiled s120m-peer, benchmarks/NOTES.md)
    partials = [torch.empty(_SPLITS, S, half, dtype=torch.float32, device=q_MQ.device) for _ in range(2)]
    if M:
        launch(_query_grad_kernel)[(triton.cdiv(M, _ROWS),)](dscores_Mk, idx_Mk, keys_1, keys_2, dq_MQ, M, S, Q,
                                                     HALF=half, HP=hp, K=k, ROWS=_ROWS)
    for half_index, sub_idx in enumerate((idx_Mk // S, idx_Mk % S)):
        # the (row, slot) pairs grouped by the sub-key they used, each sub-key's in a fixed order
        order, offsets = group_by_index(sub_idx, S)
        launch(_sub_key_grad_kernel)[(S, _SPLITS)](order, offsets, dscores_Mk, q_MQ, partials[half_index], Q,
                                                   half_index * half, S, HALF=half, HP=hp, K=k, BLOCK_P=_PAIRS,
                                                   SPLITS=_SPLITS)
    return dq_MQ, partials[0].sum(dim=0), partials[1].sum(dim=0)


@fake(_product_key_topk_backward)
def _(dscores_Mk, q_MQ, keys_1, keys_2, idx_Mk):
    return (q_MQ.new_empty(q_MQ.shape, dtype=torch.float32), keys_1.new_empty(keys_1.shape, dtype=torch.float32),
            keys_2.new_empty(keys_2.shape, dtype=torch.float32))


def _backward(ctx, dscores_Mk: Tensor, _didx):
    q_MQ, keys_1, keys_2, idx_Mk = ctx.saved_tensors
    dq, dkeys_1, dkeys_2 = _product_key_topk_backward(dscores_Mk, q_MQ, keys_1, keys_2, idx_Mk)
    return dq.to(q_MQ.dtype), dkeys_1.to(keys_1.dtype), dkeys_2.to(keys_2.dtype), None


_product_key_topk.register_autograd(_backward, setup_context=_setup_context)


def fused_product_key_topk(q_NHQ: Tensor, sub_keys_1: Tensor, sub_keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Same contract as ``finemoe.layers.routing.product_key_topk``: ``(scores_NHk,
    idx_NHk)``, float32 scores best first, ``idx = a · S + b``."""
    *lead, Q = q_NHQ.shape
    scores, idx = _product_key_topk(q_NHQ.reshape(-1, Q), sub_keys_1, sub_keys_2, k)
    return scores.view(*lead, k), idx.view(*lead, k)
