"""Routing helpers shared by every routed design (moe, cartesian, and later kinds).

All router math runs in float32, even under bf16 autocast (METHODS.md preamble).
Losses are pure keyword-only functions; the caller multiplies by its coefficient.

Shapes: N tokens, E experts, K experts per token, C tokens per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.grouping import sort_stably
from finemoe.kernels.topk import row_topk_indices, row_topk_supported
from finemoe.layers.common import at_least_float32, float32_linear

__all__ = [
    "count_per_expert",
    "counts_of_sorted",
    "sort_by_expert",
    "router_probs",
    "topk_routing",
    "expert_choice_routing",
    "load_balancing_loss",
    "router_z_loss",
    "expert_load",
    "router_entropy",
    "product_key_topk",
]


def router_probs(logits_NE: Tensor) -> Tensor:
    """``p = softmax(r)`` in float32."""
    return torch.softmax(at_least_float32(logits_NE), dim=-1)


def topk_routing(probs_NE: Tensor, k: int, *, renormalize: bool, skip_top1: bool = False) -> tuple[Tensor, Tensor]:
    """Token-choice top-k: each token keeps its ``k`` most probable experts.

    ``skip_top1`` disables every token's top-1 expert and routes to the next ``k``
    (the routing-robustness test of CartesianMoE, METHODS.md §3). Weights are the
    router probabilities of the kept experts, renormalised to sum to 1 if asked.

    Returns ``(weights_NK, idx_NK)``, weights in float32.
    """
    kept = k + int(skip_top1)
    if row_topk_supported(probs_NE, kept):
        # the k best of a few experts in registers (finemoe.kernels.topk: 2 against 70 µs
        # for 32,768 tokens, E = 8); the weights gathered here, so autograd sees them
        idx_NK = row_topk_indices(probs_NE, kept)
        weights_NK = probs_NE.gather(-1, idx_NK)
    else:  # unsorted unless the top-1 must be found: the layer sums over its k experts
        weights_NK, idx_NK = probs_NE.topk(kept, dim=-1, sorted=skip_top1)
    if skip_top1:
        weights_NK, idx_NK = weights_NK[:, 1:], idx_NK[:, 1:]
    if renormalize:
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    return weights_NK, idx_NK


def expert_choice_routing(probs_NE: Tensor, capacity: int, *, skip_top1: bool = False) -> tuple[Tensor, Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its ``capacity``
    tokens of highest router probability. A token may be taken by several experts
    or by none.

    Note: an expert chooses among all tokens of the batch, later positions included,
    so this router is not causal; the PEER paper uses it as a training baseline.

    ``skip_top1`` removes each token's top-1 expert from its candidates.
    Returns ``(weights_EC, idx_EC)``: the probability and index of each chosen token.
    """
    if skip_top1:
        top1_N1 = probs_NE.argmax(dim=-1, keepdim=True)
        probs_NE = probs_NE.scatter(-1, top1_N1, -1.0)  # below any probability: never chosen first
    weights_EC, idx_EC = probs_NE.t().topk(capacity, dim=-1)
    return weights_EC.clamp_min(0.0), idx_EC


def sort_by_expert(idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``(sorted ids, order)``: a stable sort of the flattened expert ids of ``idx``, in
    the narrowest integer type that holds them (one radix pass per key byte:
    ``finemoe.kernels.grouping``)."""
    return sort_stably(idx, num_experts)


def count_per_expert(idx: Tensor, num_experts: int) -> Tensor:
    """How many entries of ``idx`` name each expert, ``(E,)`` int64, on the device:
    the ends of each expert's run in the sorted ids (``torch.bincount`` reads the
    maximum on the host to size its output: a sync; a scatter-add of ones contends on
    E counters). The sort is the one ``sort_by_expert`` makes for the dispatch (which
    reads its counts off that sort with ``counts_of_sorted``); a compiled graph computes
    it once for both."""
    return counts_of_sorted(sort_by_expert(idx, num_experts)[0], num_experts)


def counts_of_sorted(sorted_ids: Tensor, num_experts: int) -> Tensor:
    """``count_per_expert`` of ids already sorted (``sort_by_expert``'s first output)."""
    bounds = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.diff(torch.searchsorted(sorted_ids, bounds))


def expert_load(idx: Tensor, num_experts: int) -> Tensor:
    """Fraction of routed slots that went to each expert, ``(E,)`` float32."""
    return count_per_expert(idx, num_experts).float() / max(idx.numel(), 1)


def load_balancing_loss(*, probs_NE: Tensor, idx_NK: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i P_i`` (Fedus et al. 2021, eq. 4).

    ``f_i``: fraction of routed slots sent to expert i; ``P_i``: mean router
    probability of expert i. Equals 1 for perfectly uniform routing.
    """
    num_experts = probs_NE.shape[-1]
    f_E = expert_load(idx_NK, num_experts)
    P_E = at_least_float32(probs_NE).mean(dim=0)
    return num_experts * torch.sum(f_E * P_E)


def router_z_loss(*, logits_NE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(r)²)`` (Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(at_least_float32(logits_NE), dim=-1).pow(2).mean()


def router_entropy(probs_NE: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token router distribution."""
    p = at_least_float32(probs_NE)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


def product_key_topk(q_NHQ: Tensor, sub_keys_1: Tensor, sub_keys_2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k over N = S² product keys (Lample et al. 2019, §3.2; PEER eq. 3-4).

    The key of expert (a, b) is ``[c_a ; c'_b]``, so ``q · k_ab = q¹ · c_a + q² · c'_b``
    with q split into halves. The k best sums have both parts among the top-k of their
    half, so: top-k of ``q¹ C``, top-k of ``q² C'``, then top-k of the k² sums —
    O((S + k²) · Q) per query instead of O(N · Q).

    q_NHQ: ``(N, H, Q)`` queries (Q = key width); sub-key tables ``(S, Q/2)``.
    Returns ``(scores_NHk, idx_NHk)`` with ``idx = a · S + b``, best first.
    """
    half = q_NHQ.shape[-1] // 2
    S = sub_keys_1.shape[0]
    # float32 products (router math), whose backward stays float32 under torch.compile too
    scores1_NHk, idx1_NHk = float32_linear(q_NHQ[..., :half], sub_keys_1).topk(k, dim=-1)  # (N, H, S) → top-k
    scores2_NHk, idx2_NHk = float32_linear(q_NHQ[..., half:], sub_keys_2).topk(k, dim=-1)
    pair_scores = (scores1_NHk.unsqueeze(-1) + scores2_NHk.unsqueeze(-2)).flatten(-2)  # (N, H, k·k)
    scores_NHk, pair_NHk = pair_scores.topk(k, dim=-1)
    a_NHk = idx1_NHk.gather(-1, torch.div(pair_NHk, k, rounding_mode="floor"))
    b_NHk = idx2_NHk.gather(-1, pair_NHk % k)
    return scores_NHk, a_NHk * S + b_NHk
