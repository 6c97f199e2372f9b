"""What layers tell about a forward call: typed statistics records, one channel for all.

A caller that wants statistics passes a ``Stats`` to the FFN (``ffn(h, stats=Stats())``;
the model does it per block when asked ``return_stats=True``); the layer, and the
helpers it calls, ``add`` records to it. Each record is a small dataclass of tensors
already reduced over the batch, on the device, and knows

- how two of its kind add up (``merge``: the analysis streams many batches),
- what it means (``summary``: the JSON of ``finemoe analyze``, per layer, and
  ``model_summary`` over the layers),
- what the trainer logs of it (``scalars``, at logging steps).

So the trainer and ``finemoe analyze`` read every design's statistics without knowing
any design. The records are statistics, not designs: ``Routing`` is emitted by every
routed layer, ``BlockActivity`` by any layer whose units switch on per token, and a new
design may define its own record the same way (a subclass with a ``name``).

``detailed`` records (histograms of every hidden unit) are made only when the caller
asks (``Stats(detailed=True)``, as the analysis does): they need the activations that
the fused kernels never materialise, so layers then take their reference paths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

__all__ = ["Activations", "BlockActivity", "Gates", "HIST_BINS", "HIST_RANGE", "NSAR_THRESHOLDS", "Record", "Retrieval",
           "Routing", "Stats", "kl_to_uniform", "merged", "wants"]

NSAR_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.2)
"""Magnitudes above which an activation counts as non-sparse (Finedeep's NSAR)."""
HIST_RANGE = (-1.0, 3.0)
HIST_BINS = 200


def _value(x) -> float:
    return float(x) if not isinstance(x, Tensor) else float(x.item())


@dataclass
class Record:
    """A statistic of one call (or, merged, of many): fields are tensors or floats that
    add up; ``None`` fields are absent (and stay so)."""

    name: ClassVar[str] = ""
    """Key of the record's summary in the layer's entry of ``finemoe analyze``."""
    detailed: ClassVar[bool] = False
    """Costly to make: only when the caller asks for detailed statistics."""

    def merge(self, other: "Record") -> "Record":
        """The record of both calls: every field added."""
        values = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = None if a is None or b is None else a + b
        return type(self)(**values)

    def summary(self) -> dict:
        """JSON-ready meaning, merged into the layer's entry of the analysis."""
        raise NotImplementedError

    def scalars(self) -> dict[str, float]:
        """What the trainer logs at logging steps (a host read each); none by default."""
        return {}

    @classmethod
    def model_summary(cls, records: list["Record"]) -> dict:
        """A model-level summary over every layer's record of this kind (none by default)."""
        return {}


class Stats:
    """The statistics one forward call collects: ``add(record)`` from a layer or a helper.
    ``detailed``: whether costly records are wanted. ``within(part)`` gives the same
    collector for a named part of a layer (CartesianMoE's sub-layers ``A``, ``B``), whose
    records the analysis reports as ``layer3/A``."""

    def __init__(self, detailed: bool = False, *, part: str = "", records: list | None = None):
        self.detailed = detailed
        self.part = part
        self.records: list[tuple[str, Record]] = [] if records is None else records

    def add(self, record: Record) -> None:
        if self.wants(type(record)):
            self.records.append((self.part, record))

    def wants(self, record_type: type[Record]) -> bool:
        return self.detailed or not record_type.detailed

    def within(self, part: str) -> "Stats":
        return Stats(self.detailed, part=f"{self.part}/{part}" if self.part else part, records=self.records)


def merged(records: list[tuple[str, Record]], into: dict | None = None) -> dict[tuple[str, str], Record]:
    """``(part, record)`` pairs → one record per ``(part, record name)``, records of the
    same place and kind merged (added to those already in ``into``, if given)."""
    out = {} if into is None else into
    for part, record in records:
        key = (part, record.name)
        out[key] = out[key].merge(record) if key in out else record
    return out


def wants(stats: Stats | None, record_type: type[Record]) -> bool:
    """Whether a call collecting ``stats`` (None: none) wants records of ``record_type``."""
    return stats is not None and stats.wants(record_type)


# -- the records of finemoe's designs --------------------------------------------------------------


@dataclass
class Activations(Record):
    """Finedeep's activation sparsity, for every kind alike: histograms and counts above
    each NSAR threshold of the activation function's output (``act``) and of the product
    fed to the down projection (``gated``)."""

    name: ClassVar[str] = "activations"
    detailed: ClassVar[bool] = True
    count: Tensor
    exceed_act: Tensor
    exceed_gated: Tensor
    hist_act: Tensor
    hist_gated: Tensor
    outside_act: Tensor
    """(below the histogram's range, above it)"""
    outside_gated: Tensor

    @classmethod
    def of(cls, act: Tensor, gated: Tensor) -> "Activations":
        parts = {}
        for which, value in (("act", act), ("gated", gated)):
            v = value.detach().float().reshape(-1)
            magnitude = v.abs()  # one comparison per threshold: no (values × thresholds) tensor
            parts[f"exceed_{which}"] = torch.stack([(magnitude > t).sum() for t in NSAR_THRESHOLDS]).double()
            parts[f"hist_{which}"] = torch.histc(v, HIST_BINS, *HIST_RANGE).double()
            parts[f"outside_{which}"] = torch.stack([(v < HIST_RANGE[0]).sum(), (v > HIST_RANGE[1]).sum()]).double()
        return cls(count=torch.tensor(float(act.numel()), dtype=torch.float64, device=act.device), **parts)

    def summary(self) -> dict:
        count = _value(self.count)
        if count == 0:
            return {}
        edges = torch.linspace(*HIST_RANGE, HIST_BINS + 1).tolist()
        out = {}
        for which in ("act", "gated"):
            exceed, outside = getattr(self, f"exceed_{which}").cpu(), getattr(self, f"outside_{which}").cpu()
            out[f"nsar_{which}"] = {str(t): float(e) / count for t, e in zip(NSAR_THRESHOLDS, exceed)}
            out[f"hist_{which}"] = {"edges": edges, "counts": getattr(self, f"hist_{which}").tolist(),
                                    "below": float(outside[0]), "above": float(outside[1]), "total": count}
        return out

    @classmethod
    def model_summary(cls, records: list["Activations"]) -> dict:
        total = sum(_value(r.count) for r in records)
        if total == 0:
            return {}
        return {f"nsar_{which}": {str(t): float(e) / total for t, e in
                                  zip(NSAR_THRESHOLDS, sum(getattr(r, f"exceed_{which}").cpu() for r in records))}
                for which in ("act", "gated")}


@dataclass
class Routing(Record):
    """A router's choices: routed slots per expert, mean router probabilities, entropy,
    and (expert choice) the tokens no expert took."""

    name: ClassVar[str] = "routing"
    slot_counts: Tensor
    prob_sum: Tensor
    entropy_sum: Tensor
    tokens: Tensor
    dropped_tokens: Optional[Tensor] = None

    @classmethod
    def of(cls, probs_NE: Tensor, slots: Tensor, kept: Tensor | None = None,
           dropped_tokens: Tensor | None = None) -> "Routing":
        """``probs_NE``: router probabilities; ``slots``: the expert of every routed slot;
        ``kept``: which slots were used, where a layer routes a variable number per token
        (a mask of ``slots``' shape: no data-dependent shapes, so it compiles);
        ``dropped_tokens``: how many tokens no expert took (expert choice)."""
        with torch.no_grad():
            probs = probs_NE.detach().float()
            N, E = probs.shape
            flat = slots.reshape(-1)
            used = (torch.ones(flat.shape, dtype=torch.float64, device=probs.device) if kept is None
                    else kept.reshape(-1).double())
            counts = torch.zeros(E, dtype=torch.float64, device=probs.device).index_add_(0, flat, used)
            from finemoe.layers.routing import router_entropy  # routing imports common, which imports this module

            entropy = (router_entropy(probs) * N).double()
            tokens = torch.tensor(float(N), dtype=torch.float64, device=probs.device)
            return cls(counts, probs.sum(0).double(), entropy, tokens,
                       None if dropped_tokens is None else dropped_tokens.double())

    def _share(self) -> Tensor:
        return self.slot_counts / self.slot_counts.sum().clamp_min(1)

    def summary(self) -> dict:
        share, tokens = self._share().cpu(), _value(self.tokens)
        out = {
            "token_share": share.tolist(),
            "imbalance": float(share.max() / share.mean()),
            "router_entropy": _value(self.entropy_sum) / tokens,
            "max_entropy": math.log(len(share)),
            "unused_expert_share": float((self.slot_counts.cpu() == 0).double().mean()),
            "mean_router_prob": (self.prob_sum.cpu() / tokens).tolist(),
            "experts_per_token": _value(self.slot_counts.sum()) / tokens,
            "tokens": tokens,
        }
        if self.dropped_tokens is not None:
            out["dropped_token_share"] = _value(self.dropped_tokens) / tokens
        return {"routing": out}

    def scalars(self) -> dict[str, float]:
        share = self._share()
        out = {"expert_load_imbalance": _value(share.max() / share.mean()),
               "router_entropy": _value(self.entropy_sum / self.tokens),
               "experts_per_token": _value(self.slot_counts.sum() / self.tokens)}
        if self.dropped_tokens is not None:
            out["dropped_token_share"] = _value(self.dropped_tokens / self.tokens)
        return out


@dataclass
class BlockActivity(Record):
    """Units switched on per token (DSMoE's gated blocks): how many tokens switched on
    each block. The layer's measured active share is read from this record's summary."""

    name: ClassVar[str] = "active_blocks"
    active_counts: Tensor
    tokens: Tensor

    @classmethod
    def of(cls, active_Nn: Tensor) -> "BlockActivity":
        with torch.no_grad():
            return cls(active_Nn.detach().double().sum(0),
                       torch.tensor(float(active_Nn.shape[0]), dtype=torch.float64, device=active_Nn.device))

    def summary(self) -> dict:
        per_block = (self.active_counts / self.tokens.clamp_min(1)).cpu()
        return {"active_blocks": {"active_share": float(per_block.mean()), "active_share_per_block": per_block.tolist()}}

    def scalars(self) -> dict[str, float]:
        per_block = self.active_counts / self.tokens.clamp_min(1)
        return {"active_share": _value(per_block.mean()),
                "block_imbalance": _value(per_block.max() / per_block.mean().clamp_min(1e-12))}


@dataclass
class Gates(Record):
    """Soft gates over the experts of stacked sub-layers (Finedeep's routers): the
    gate summed over tokens, ``(sub-layers, experts)``."""

    name: ClassVar[str] = "gates"
    gate_sum: Tensor
    tokens: Tensor

    @classmethod
    def of(cls, gates_MNK: list[Tensor]) -> "Gates":
        """``gates_MNK``: each sub-layer's ``(N, K)`` gates."""
        with torch.no_grad():
            g = torch.stack([x.detach().double().sum(0) for x in gates_MNK])
            return cls(g, torch.tensor(float(gates_MNK[0].shape[0]), dtype=torch.float64, device=g.device))

    def summary(self) -> dict:
        return {"gates": {"gate_mean": (self.gate_sum / self.tokens.clamp_min(1)).cpu().tolist()}}


@dataclass
class Retrieval(Record):
    """Retrieval from a pool of experts by product keys (PEER, PKM): the gate mass each
    expert received per head, ``(heads, pool)``, and how often each was retrieved."""

    name: ClassVar[str] = "product_keys"
    mass: Tensor
    count: Tensor
    tokens: Tensor

    @classmethod
    def of(cls, idx_NHk: Tensor, gates_NHk: Tensor, num_experts: int) -> "Retrieval":
        with torch.no_grad():
            N, H, _ = idx_NHk.shape
            device = idx_NHk.device
            mass = torch.zeros(H, num_experts, dtype=torch.float32, device=device)
            # one flat index_add over (head, expert) pairs: no per-head loop, no (N, pool) tensor
            flat = (idx_NHk + torch.arange(H, device=device).view(1, H, 1) * num_experts).reshape(-1)
            mass.view(-1).index_add_(0, flat, gates_NHk.detach().float().reshape(-1))
            count = torch.zeros(num_experts, dtype=torch.float32, device=device).index_add_(
                0, idx_NHk.reshape(-1), torch.ones(idx_NHk.numel(), dtype=torch.float32, device=device))
            return cls(mass, count, torch.tensor(float(N), dtype=torch.float64, device=device))

    def summary(self) -> dict:
        mass = self.mass.double().cpu()
        total = mass.sum(0)
        return {"product_keys": {
            "num_experts": int(total.numel()),
            "usage": float((total > 0).double().mean()),
            "unevenness_kl": kl_to_uniform(total),
            "usage_per_head": [float((m > 0).double().mean()) for m in mass],
            "unevenness_kl_per_head": [kl_to_uniform(m) for m in mass],
            "retrieval_count_hist": _log_hist(self.count.cpu()),
            "tokens": _value(self.tokens),
        }}

    def scalars(self) -> dict[str, float]:
        return {"retrieved_share": _value((self.mass.sum(0) > 0).float().mean())}


def entropy_nats(p: Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def kl_to_uniform(z: Tensor) -> float:
    """KL(z ‖ uniform) = log N + Σ z log z for a distribution z over N experts."""
    n = z.numel()
    total = z.sum()
    if total <= 0:
        return float("nan")
    return math.log(n) - entropy_nats(z / total)


def _log_hist(counts: Tensor) -> dict:
    """How many experts were retrieved 0, 1, 2-3, 4-7, ... times."""
    c = counts.double()
    edges = [0, 1, 2]
    while edges[-1] <= c.max().item():
        edges.append(edges[-1] * 2)
    hist = [int(((c >= lo) & (c < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    return {"edges": edges, "experts": hist}
