"""Sampling from a model with a KV cache: temperature, top-k and nucleus (top-p).

The prompt is run once (prefill), then one token per step attends to the cached keys
and values. Every FFN kind is position-wise, so the cache holds attention state only.
(Expert-choice MoE routes among all tokens of a batch, so it is not causal and its
cached decoding differs from a full recomputation; the other kinds agree exactly.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from finemoe.model import KVCache, Transformer

__all__ = ["sample_next", "generate"]


def sample_next(logits_BV: Tensor, *, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """One token per row; ``temperature = 0`` is greedy decoding."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs_BV.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue ``prompt_ids`` ``(B, T)``; returns ``(B, T + n)``. A row ends at any of
    the end tokens ``eos_id`` (one id or several: an instruct model's end-of-turn token
    beside its end-of-text) and is padded with the token that ended it. The prompt plus
    new tokens must fit in ``max_seq_len``; a longer prompt keeps its last tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    ids = prompt_ids.to(device)[:, -(max_len - 1) :]
    max_new_tokens = min(max_new_tokens, max_len - ids.shape[1])
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    end_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long, device=device)
    last = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
    cache = KVCache(model, ids.shape[0], max_len) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else ids, cache=cache).logits[:, -1]
        next_ids = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        if len(end_ids):
            next_ids = torch.where(finished, last, next_ids)
            finished |= torch.isin(next_ids, end_ids)
            last = next_ids
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        step_input = next_ids[:, None]
        if len(end_ids) and bool(finished.all()):
            break
    model.train(was_training)
    return ids
