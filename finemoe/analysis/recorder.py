"""The analysis recorder: streaming statistics of what layers report.

``Recorder.attach(model)`` names every module inside each block's FFN (``layer3``,
``layer3/A`` for CartesianMoE's sub-layers, ...) and sets its ``recorder``; layers then
hand tensors to ``observe`` through ``finemoe.layers.base.report``. Everything is
accumulated in place on the model's device — fixed-bin histograms, threshold counts,
per-expert counts and gate mass — so memory stays bounded however many batches stream
through (PEER's per-expert mass is one ``(heads, N)`` tensor per layer, on the device).
``detach()`` removes it again.
"""

from __future__ import annotations

import math
import string
from collections import defaultdict

import torch
from torch import Tensor, nn

from finemoe.layers.routing import router_entropy

__all__ = ["Recorder", "NSAR_THRESHOLDS", "HIST_RANGE", "HIST_BINS"]

NSAR_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.2)
HIST_RANGE = (-1.0, 3.0)
HIST_BINS = 200


def _ffn_record_names(model: nn.Module) -> dict[nn.Module, str]:
    """Every module inside a block's FFN → a record name for its layer."""
    names: dict[nn.Module, str] = {}
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        for name, module in ffn.named_modules():
            record = f"layer{i}"
            if name.startswith("sublayers."):  # stacked sub-layers (CartesianMoE's A and B): A, B, C, ...
                record += "/" + string.ascii_uppercase[int(name.split(".")[1])]
            names[module] = record
    return names


class Recorder:
    """Accumulates, per layer: activation histograms and NSAR counts (``act`` = the
    activation function's output, ``gated`` = the product fed to the down projection),
    expert loads and router entropy, DSMoE block activity, PEER/PKM gate mass."""

    def __init__(self, *, thresholds: tuple[float, ...] = NSAR_THRESHOLDS, hist_range=HIST_RANGE, bins=HIST_BINS):
        self.thresholds = tuple(thresholds)
        self.hist_range = hist_range
        self.bins = bins
        self.stats: dict[str, dict[str, Tensor | float]] = defaultdict(dict)
        self._attached: list[nn.Module] = []

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "Recorder":
        for module, name in _ffn_record_names(model).items():
            module.record_name = name
            module.recorder = self
            self._attached.append(module)
        return self

    def detach(self) -> None:
        for module in self._attached:
            module.__dict__.pop("recorder", None)
        self._attached.clear()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        self.stats.clear()

    # -- accumulation -----------------------------------------------------------------------------
    def _add(self, layer: str, key: str, value: Tensor | float) -> None:
        store = self.stats[layer]
        if key in store:
            store[key] = store[key] + value
        else:
            store[key] = value.clone() if isinstance(value, Tensor) else value

    @torch.no_grad()
    def observe(self, layer: str, key: str, **values) -> None:
        getattr(self, f"_observe_{key}")(layer, **values)

    def _observe_activations(self, layer: str, act: Tensor, gated: Tensor) -> None:
        for name, value in (("act", act), ("gated", gated)):
            v = value.detach().float().reshape(-1)
            if v.numel() == 0:
                continue
            magnitude = v.abs()
            exceed = torch.stack([(magnitude > t).sum() for t in self.thresholds]).double()
            self._add(layer, f"{name}/exceed", exceed)
            self._add(layer, f"{name}/count", float(v.numel()))
            self._add(layer, f"{name}/hist", torch.histc(v, self.bins, *self.hist_range).double())
            self._add(layer, f"{name}/below", float((v < self.hist_range[0]).sum()))
            self._add(layer, f"{name}/above", float((v > self.hist_range[1]).sum()))

    def _observe_routing(self, layer: str, probs: Tensor, slots: Tensor, chosen_tokens: Tensor | None) -> None:
        probs = probs.detach().float()
        N, E = probs.shape
        self._add(layer, "route/slot_counts", torch.bincount(slots.reshape(-1), minlength=E).double())
        self._add(layer, "route/prob_sum", probs.sum(0).double())
        self._add(layer, "route/entropy_sum", float(router_entropy(probs)) * N)
        self._add(layer, "route/tokens", float(N))
        if chosen_tokens is not None:  # expert choice: tokens that no expert took
            chosen = torch.zeros(N, dtype=torch.bool, device=probs.device)
            chosen[chosen_tokens] = True
            self._add(layer, "route/dropped_tokens", float((~chosen).sum()))

    def _observe_block_gates(self, layer: str, active: Tensor) -> None:
        self._add(layer, "dsmoe/active_counts", active.detach().sum(0).double())
        self._add(layer, "dsmoe/tokens", float(active.shape[0]))

    def _observe_gates(self, layer: str, gates: Tensor, sublayer: Tensor) -> None:
        g = gates.detach().float()
        m = int(sublayer)
        self._add(layer, f"finedeep/gate_sum/{m}", g.sum(0).double())
        self._add(layer, f"finedeep/tokens/{m}", float(g.shape[0]))

    def _observe_retrieval(self, layer: str, idx: Tensor, gates: Tensor, num_experts: int) -> None:
        """Retrieval from a pool of ``num_experts`` (PEER, PKM, any product-key layer)."""
        N, H, k = idx.shape
        store = self.stats[layer]
        if "pk/mass" not in store:
            store["pk/mass"] = torch.zeros(H, num_experts, dtype=torch.float64, device=idx.device)
            store["pk/count"] = torch.zeros(num_experts, dtype=torch.float64, device=idx.device)
            store["pk/tokens"] = 0.0
        mass = store["pk/mass"]
        for h in range(H):  # in place: no per-batch N-sized allocation beyond the accumulators
            mass[h].index_add_(0, idx[:, h].reshape(-1), gates[:, h].detach().reshape(-1).double())
        store["pk/count"].index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64, device=idx.device))
        store["pk/tokens"] += float(N)


def entropy_nats(p: Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def kl_to_uniform(z: Tensor) -> float:
    """KL(z ‖ uniform) = log N + Σ z log z for a distribution z over N experts."""
    n = z.numel()
    total = z.sum()
    if total <= 0:
        return float("nan")
    p = z / total
    return math.log(n) - entropy_nats(p)
