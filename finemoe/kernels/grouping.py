"""Indices sorted and grouped by value, for the passes that gather or sum per group.

Routed layers sort their (token, slot) pairs by expert to dispatch them; the backward
passes of product-key retrieval and of the PEER/PKM experts sum, for each sub-key or
table row, over the pairs that used it. Both sort stably: the order within a group is
fixed (the sums are deterministic, with no atomic adds), and ``searchsorted`` gives the
groups' bounds without a host sync.

The index is sorted in the narrowest integer type that holds it: CUB's radix sort makes
a pass per byte of key (65,536 router slots on an H100: 18 µs as uint8 against 67 as
int64, benchmarks/experiments/routing_ops.py; 4.2M product-key pairs: 0.17 ms as int16,
0.29 as int32, 0.59 as int64, results/experiments/retrieval_passes/).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_by_index", "sort_stably"]


def _key_dtype(bound: int) -> torch.dtype:
    """The narrowest integer type holding ``0 … bound``."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def sort_stably(index: Tensor, bound: int) -> tuple[Tensor, Tensor]:
    """``(sorted values, order)`` of ``index.reshape(-1)``, values in ``[0, bound)``: a
    stable sort, the values in the narrowest integer type that holds ``bound``."""
    return torch.sort(index.reshape(-1).to(_key_dtype(bound)), stable=True)


def group_by_index(index: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """``(order, offsets)`` for an index of values in ``[0, groups)``: ``order`` (int64)
    lists the positions of ``index.reshape(-1)`` sorted by value, stably; the positions of
    group g are ``order[offsets[g]:offsets[g + 1]]`` (``offsets``: int64, groups + 1)."""
    sorted_index, order = sort_stably(index, groups)
    bounds = torch.arange(groups + 1, device=index.device, dtype=sorted_index.dtype)
    return order, torch.searchsorted(sorted_index, bounds)
