"""Product-key retrieval (Lample et al. 2019 §3.2; PEER eq. 3-4) in one kernel: the two
sub-key score products, the two top-k and the top-k of the k² sums, without writing the
``(N, H, S)`` score tensors.

For a query q = [q¹ ; q²] (rows are (token, head) pairs) and sub-key tables C, C' of S
rows each, the key of expert (a, b) is [c_a ; c'_b], so

    score(a, b) = q¹ · c_a + q² · c'_b

and the k best sums have both parts among the top-k of their half. The eager reference
(``finemoe.layers.routing.product_key_topk``) writes the two ``(N·H, S)`` score matrices
(512 MB each in float32 at 16,384 tokens, 8 heads, S = 1024) and runs a radix top-k over
them: 10 ms of its 21 ms forward + backward at that size on an H100. Here one program
takes R rows: it computes the ``(R, S)`` scores of one half in registers (``tl.dot`` in
IEEE float32: router math stays float32), pulls out the k best by k rounds of
max-and-mask (ties go to the lower index), does the same for the other half, then the
top-k of the k² pair sums the same way. Nothing larger than ``(R, S)`` exists, and only
the ``(N·H, k)`` scores and indices are written.

Backward, with ``ds`` the gradient of the k retrieved scores and a, b the two halves of
each retrieved index (PyTorch, not a kernel: two scatters into dense ``(N·H, S)``
matrices and four matrix products, the same work as the eager path's backward):

    dq¹ = Σ_k ds_k c_{a_k}        dc_a += ds_k q¹   (and likewise for q², c'_b)

Kernel → launcher → ``torch.library.custom_op`` (fake implementation) → autograd.
Tested against the eager reference and brute force over all S² keys on the CPU under
``TRITON_INTERPRET=1``.

Shapes: M = N·H query rows, Q key width (two halves of Q/2), S sub-keys per table
(padded to SP, a power of two), k retrieved (padded to KP).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["fused_product_key_topk", "fused_product_key_topk_supported"]

_ROWS = 16  # query rows per program (tl.dot's smallest M)
_MAX_SUB_KEYS = 1024  # an (R, S) float32 tile in registers; S = 1024 is N = 1024² experts
_BLOCK_Q = 32  # key-width chunk of the score product
_NUM_WARPS = 8


def fused_product_key_topk_supported(sub_keys: int, k: int) -> bool:
    """Triton installed and the tables small enough for one register tile per half."""
    return triton is not None and sub_keys <= _MAX_SUB_KEYS and k * k <= _MAX_SUB_KEYS


if triton is not None:

    @triton.jit
    def _top_k_rounds(scores, cols, K: tl.constexpr, KP: tl.constexpr):
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
    def _half_scores(q_ptr, keys_ptr, rows, rmask, Q, half_offset, S,
                     HALF: tl.constexpr, SP: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr):
        """``q_half · Cᵀ`` for this program's rows: (ROWS, SP) float32, -inf past S."""
        keys = tl.arange(0, SP)
        kmask = keys < S
        acc = tl.zeros((ROWS, SP), dtype=tl.float32)
        for qc in tl.static_range(0, HALF, BLOCK_Q):
            qcols = qc + tl.arange(0, BLOCK_Q)
            qmask = qcols < HALF
            q = tl.load(q_ptr + rows[:, None] * Q + half_offset + qcols[None, :],
                        mask=rmask[:, None] & qmask[None, :], other=0.0)
            c = tl.load(keys_ptr + keys[None, :] * HALF + qcols[:, None], mask=qmask[:, None] & kmask[None, :],
                        other=0.0)
            acc += tl.dot(q, c, input_precision="ieee")
        return tl.where(kmask[None, :], acc, float("-inf"))

    @triton.jit
    def _product_key_topk_kernel(q_ptr, keys1_ptr, keys2_ptr, scores_ptr, idx_ptr, M, Q, S,
                                 HALF: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, SP: tl.constexpr,
                                 BLOCK_Q: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        sub = tl.arange(0, SP)
        s1 = _half_scores(q_ptr, keys1_ptr, rows, rmask, Q, 0, S, HALF, SP, BLOCK_Q, ROWS)
        top1, a = _top_k_rounds(s1, sub, K, KP)
        s2 = _half_scores(q_ptr, keys2_ptr, rows, rmask, Q, HALF, S, HALF, SP, BLOCK_Q, ROWS)
        top2, b = _top_k_rounds(s2, sub, K, KP)
        # the k² pair sums, (ROWS, KP·KP): pair p = i·KP + j is (a_i, b_j); padding is -inf
        pairs = tl.reshape(top1[:, :, None] + top2[:, None, :], (ROWS, KP * KP))
        best, p = _top_k_rounds(pairs, tl.arange(0, KP * KP), K, KP)
        kcols = tl.arange(0, KP)
        # a[p // KP] and b[p % KP], picked out of the registers by a one-hot sum
        out_a = tl.sum(tl.where((p // KP)[:, :, None] == kcols[None, None, :], a[:, None, :], 0), axis=2)
        out_b = tl.sum(tl.where((p % KP)[:, :, None] == kcols[None, None, :], b[:, None, :], 0), axis=2)
        kmask = rmask[:, None] & (kcols[None, :] < K)
        out = rows[:, None] * K + kcols[None, :]
        tl.store(scores_ptr + out, best, mask=kmask)
        tl.store(idx_ptr + out, out_a.to(tl.int64) * S + out_b.to(tl.int64), mask=kmask)


def _launch(q_MQ: Tensor, keys_1: Tensor, keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    M, Q = q_MQ.shape
    S, half = keys_1.shape
    scores = torch.empty(M, k, dtype=torch.float32, device=q_MQ.device)
    idx = torch.empty(M, k, dtype=torch.int64, device=q_MQ.device)
    if M:
        kp = max(2, triton.next_power_of_2(k))
        _product_key_topk_kernel[(triton.cdiv(M, _ROWS),)](
            q_MQ, keys_1, keys_2, scores, idx, M, Q, S, HALF=half, K=k, KP=kp,
            SP=max(16, triton.next_power_of_2(S)), BLOCK_Q=min(_BLOCK_Q, triton.next_power_of_2(half)), ROWS=_ROWS,
            num_warps=_NUM_WARPS)
    return scores, idx


@torch.library.custom_op("finemoe::product_key_topk", mutates_args=())
def _product_key_topk(q_MQ: Tensor, keys_1: Tensor, keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return _launch(q_MQ.float().contiguous(), keys_1.float().contiguous(), keys_2.float().contiguous(), k)


@_product_key_topk.register_fake
def _(q_MQ, keys_1, keys_2, k):
    M = q_MQ.shape[0]
    return q_MQ.new_empty(M, k, dtype=torch.float32), q_MQ.new_empty(M, k, dtype=torch.int64)


def _setup_context(ctx, inputs, output) -> None:
    q_MQ, keys_1, keys_2, _ = inputs
    ctx.save_for_backward(q_MQ, keys_1, keys_2, output[1])


def _backward(ctx, dscores_Mk: Tensor, _didx):
    q_MQ, keys_1, keys_2, idx_Mk = ctx.saved_tensors
    S, half = keys_1.shape
    grads = []
    for q_half, keys, sub_idx in ((q_MQ[:, :half], keys_1, idx_Mk // S), (q_MQ[:, half:], keys_2, idx_Mk % S)):
        # the score's gradient on the sub-keys it used, as a dense (M, S) matrix (a sub-key
        # can serve several of a row's k pairs, hence scatter_add)
        d_MS = torch.zeros(q_MQ.shape[0], S, dtype=torch.float32, device=q_MQ.device)
        d_MS.scatter_add_(1, sub_idx, dscores_Mk.float())
        grads.append((d_MS @ keys.float(), d_MS.t() @ q_half.float()))
    dq_MQ = torch.cat([grads[0][0], grads[1][0]], dim=1).to(q_MQ.dtype)
    return dq_MQ, grads[0][1].to(keys_1.dtype), grads[1][1].to(keys_2.dtype), None


_product_key_topk.register_autograd(_backward, setup_context=_setup_context)


def fused_product_key_topk(q_NHQ: Tensor, sub_keys_1: Tensor, sub_keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Same contract as ``finemoe.layers.routing.product_key_topk``: ``(scores_NHk,
    idx_NHk)``, float32 scores best first, ``idx = a · S + b``."""
    *lead, Q = q_NHQ.shape
    scores, idx = _product_key_topk(q_NHQ.reshape(-1, Q), sub_keys_1, sub_keys_2, k)
    return scores.view(*lead, k), idx.view(*lead, k)
