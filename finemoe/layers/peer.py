"""``peer``: Parameter-Efficient Expert Retrieval (He, arXiv 2407.04153), as specified
in METHODS.md §4.

A pool of N single-neuron experts (up to 1024² ≈ 1M), ``e_i(x) = σ(u_i · x) v_i``,
of which each head retrieves its top-k by product keys:

    q(x)    = BatchNorm(x W_q + b)             per head, Q = key width (BN on by default)
    key_ab  = [c_a ; c'_b]                     two sub-key tables shared by all heads
    top-k   of q¹·C, top-k of q²·C', top-k of the k² sums   (exact over all N keys)
    g       = softmax over the k retrieved scores            (sigmoid as an option)
    f(x)    = Σ_heads Σ_{i ∈ top-k} g_i · σ(u_i · x) v_i

The experts' ``u`` and ``v`` are stored as embedding tables and gathered by index:
nothing N-sized is built per token. No auxiliary loss.

Not the "non-competing" variant of a popular community port (ReLU scores, top-1 per
head, per-head sub-keys): that is not the paper's layer.

Shapes: N tokens, D model width, H heads, Q key width, k experts per head,
S = √(num_experts) sub-keys per table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finemoe.config import check
from finemoe.kernels.peer_experts import peer_experts, peer_experts_available, table_copies_pay
from finemoe.kernels.product_keys import fused_product_key_topk, fused_product_key_topk_supported
from finemoe.kernels.swiglu import triton_kernels_available
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Activations, Retrieval, wants
from finemoe.layers.common import RMSNorm, at_least_float32, float32_linear
from finemoe.layers.experts import compute_dtype
from finemoe.layers.routing import product_key_topk


@dataclass
class ProductKeyConfig(FFNConfig):
    """Retrieval options shared by PEER and PKM."""

    num_experts: int = 1024**2
    """N, a perfect square (the paper: 1024²)."""
    num_heads: int = 8
    """h: independent queries into the same pool."""
    top_k: int = 16
    """k retrieved per head."""
    key_dim: int = 128
    """Q: query/key width per head, split in two halves [choice]."""
    query_batchnorm: bool = True
    gate: Literal["softmax", "sigmoid"] = "softmax"
    norm_eps: float = 1e-5
    retrieval_impl: Literal["auto", "eager", "triton"] = "auto"
    """How retrieval runs: ``eager`` is ``routing.product_key_topk`` (the reference);
    ``triton`` is ``finemoe.kernels.product_keys`` (scores and the three top-k in one
    kernel, no ``(N, H, S)`` score tensors; tables of up to 1024 sub-keys); ``auto``
    (default) takes Triton on a CUDA device when it applies, else eager. Same results
    (ties aside)."""
    experts_impl: Literal["auto", "eager", "triton"] = "auto"
    """How the retrieved experts run: ``eager`` gathers their rows with PyTorch (the
    reference); ``triton`` is ``finemoe.kernels.peer_experts`` (one pass per token, no
    ``(N, H, k, D)`` gather; row gradients summed per row, deterministic); ``auto``
    (default) takes Triton on a CUDA device. The eager path is also taken when the
    activations are recorded (``finemoe analyze``)."""
    table_copies: Literal["auto", "always", "never"] = "auto"
    """Whether the Triton expert passes read copies of the retrieved rows in the input's
    dtype (bf16 under autocast) instead of the float32 tables: ``auto`` (default) where
    the input is narrower than the tables and a batch reads each row ≥ 8 times on average
    (``finemoe.kernels.peer_experts.table_copies_pay``: s120m-peer's training batches,
    not issue 12's layer size). The ``v`` rows are then rounded to bf16 (the eager path
    reads them in float32; its ``u`` rows are cast to bf16 already)."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_heads", "top_k", "key_dim"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(
            math.isqrt(self.num_experts) ** 2 == self.num_experts,
            "num_experts",
            f"must be a perfect square (product keys), got {self.num_experts}",
        )
        check(
            self.top_k <= self.sub_keys,
            "top_k",
            f"{self.top_k} is larger than the {self.sub_keys} sub-keys of each table (√num_experts)",
        )
        check(self.key_dim % 2 == 0, "key_dim", f"must be even (two halves), got {self.key_dim}")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        for name in ("retrieval_impl", "experts_impl"):
            check(getattr(self, name) in ("auto", "eager", "triton"), name,
                  f"must be 'auto', 'eager' or 'triton', got {getattr(self, name)!r}")
        check(self.table_copies in ("auto", "always", "never"), "table_copies",
              f"must be 'auto', 'always' or 'never', got {self.table_copies!r}")

    @property
    def sub_keys(self) -> int:
        return math.isqrt(self.num_experts)

    def retrieval_params(self, d_model: int) -> int:
        q = self.num_heads * self.key_dim
        batchnorm = 2 * q if self.query_batchnorm else 0
        return d_model * q + q + batchnorm + 2 * self.sub_keys * (self.key_dim // 2)

    def retrieval_flops(self, d_model: int) -> int:
        """Query projection, scoring both sub-key tables, and the k² candidate sums."""
        q = self.num_heads * self.key_dim
        scoring = self.num_heads * self.sub_keys * self.key_dim  # 2 tables × S × Q/2 MACs per head
        return 2 * d_model * q + 2 * scoring + self.num_heads * self.top_k**2


@register_ffn
@dataclass
class PEERConfig(ProductKeyConfig):
    kind: ClassVar[str] = "peer"
    activation: Literal["gelu", "relu"] = "gelu"

    def build(self, d_model: int, context: LayerContext | None = None) -> "PEERFFN":
        return PEERFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return d_model + self.retrieval_params(d_model) + 2 * self.num_experts * d_model

    def num_active_params(self, d_model: int) -> int:
        return d_model + self.retrieval_params(d_model) + self.num_heads * self.top_k * 2 * d_model

    def flops_per_token(self, d_model: int) -> int:
        experts = self.num_heads * self.top_k * 2 * d_model  # u_i · x and g_i σ(·) v_i
        return self.retrieval_flops(d_model) + 2 * experts


class ProductKeyRetrieval(nn.Module):
    """Queries, optional query BatchNorm, and the two shared sub-key tables."""

    def __init__(self, config: ProductKeyConfig, d_model: int):
        super().__init__()
        self.config = config
        width = config.num_heads * config.key_dim
        self.query = nn.Linear(d_model, width, bias=True)
        self.query_norm = nn.BatchNorm1d(width) if config.query_batchnorm else None
        self.sub_keys = nn.Parameter(torch.empty(2, config.sub_keys, config.key_dim // 2))  # C and C'

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        """``(scores_NHk, idx_NHk)`` in float32 (router math, METHODS.md preamble)."""
        cfg = self.config
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            # The query is the router's projection: float32, like the MoE router's logits,
            # so that near-ties among N keys are not decided by bf16 rounding.
            q_NQ = float32_linear(x_ND, self.query.weight, self.query.bias)
            if self.query_norm is not None:
                q_NQ = self.query_norm(q_NQ)
            q_NHQ = q_NQ.view(-1, cfg.num_heads, cfg.key_dim)
            keys = at_least_float32(self.sub_keys)
            if uses_triton(cfg.retrieval_impl, q_NHQ) and fused_product_key_topk_supported(cfg.sub_keys, cfg.top_k):
                return fused_product_key_topk(q_NHQ, keys[0], keys[1], cfg.top_k)
            return product_key_topk(q_NHQ, keys[0], keys[1], cfg.top_k)

    def route(self, u_ND: Tensor, stats: Stats | None = None) -> tuple[Tensor, Tensor]:
        """``(idx_NHk, gates_NHk)`` of the normalised input: retrieval, then the gate, and
        a ``Retrieval`` record if statistics are wanted (shared by PEER and PKM)."""
        scores_NHk, idx_NHk = self(u_ND)
        gates_NHk = self.gates(scores_NHk)
        if stats is not None:
            stats.add(Retrieval.of(idx_NHk, gates_NHk, self.config.num_experts))
        return idx_NHk, gates_NHk

    def gates(self, scores_NHk: Tensor) -> Tensor:
        if self.config.gate == "softmax":
            return torch.softmax(scores_NHk, dim=-1)
        return torch.sigmoid(scores_NHk)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.query.weight, std=std)
        nn.init.zeros_(self.query.bias)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
            self.query_norm.reset_running_stats()
        half = self.config.key_dim // 2
        nn.init.normal_(self.sub_keys, std=half**-0.5)


def uses_triton(impl: str, x: Tensor) -> bool:
    """``triton`` asked for, or ``auto`` where the other kernels run (a CUDA device, and
    ``FINEMOE_KERNELS`` not ``0``); Triton installed either way."""
    return peer_experts_available() and (impl == "triton" or (impl == "auto" and triton_kernels_available(x)))


def runs_fused_experts(module: nn.Module, x: Tensor, stats: Stats | None) -> bool:
    """Whether a PEER/PKM layer runs its experts with the Triton kernel: chosen (see
    ``uses_triton``) and the activations not recorded (the eager path has them)."""
    return uses_triton(module.config.experts_impl, x) and not wants(stats, Activations)


def fused_experts_input(u_ND: Tensor) -> Tensor:
    """The normalised input as the expert kernel takes it: in the compute dtype (bf16
    under autocast, as the eager path's products run), so that the kernel's output, its
    gradient, and the per-pair reads of both in the row-gradient pass are half the bytes."""
    return u_ND.to(compute_dtype(u_ND))


def fused_experts(config: ProductKeyConfig, u_ND: Tensor, idx_NHk: Tensor, gates_NHk: Tensor,
                  expert_in: Tensor | None, expert_out: Tensor, activation: str) -> Tensor:
    """The retrieved experts by ``finemoe.kernels.peer_experts`` (PEER; PKM with no
    ``expert_in`` and ``activation="none"``), ``(N, D)``, on ``fused_experts_input``; the
    tables are read through copies of their retrieved rows where ``table_copies`` says so."""
    x_ND = fused_experts_input(u_ND)
    idx_NJ, gates_NJ = idx_NHk.reshape(x_ND.shape[0], -1), gates_NHk.reshape(x_ND.shape[0], -1)
    copies = config.table_copies == "always" or (
        config.table_copies == "auto" and table_copies_pay(idx_NJ.numel(), expert_out.shape[0], x_ND.dtype,
                                                           expert_out.dtype))
    return peer_experts(x_ND, idx_NJ, gates_NJ, expert_in, expert_out, activation, table_copies=copies)


class PEERFFN(FFN):
    def __init__(self, config: PEERConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.retrieval = ProductKeyRetrieval(config, d_model)
        self.expert_in = nn.Parameter(torch.empty(config.num_experts, d_model))   # u_i
        self.expert_out = nn.Parameter(torch.empty(config.num_experts, d_model))  # v_i
        self.init_weights(std=0.02, out_std=0.02)

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        cfg = self.config
        B, T, D = h_BTD.shape
        u_ND = self.norm(h_BTD).reshape(B * T, D)
        idx_NHk, gates_NHk = self.retrieval.route(u_ND, stats)
        if runs_fused_experts(self, u_ND, stats):
            y_ND = fused_experts(cfg, u_ND, idx_NHk, gates_NHk, self.expert_in, self.expert_out, cfg.activation)
        else:
            y_ND = self.eager_experts(u_ND, idx_NHk, gates_NHk, stats)
        return FFNOutput(update=y_ND.to(h_BTD.dtype).reshape(B, T, D))

    def row_tables(self) -> tuple[nn.Parameter, ...]:
        return (self.expert_in, self.expert_out)

    def eager_experts(self, u_ND: Tensor, idx_NHk: Tensor, gates_NHk: Tensor, stats: Stats | None = None) -> Tensor:
        """``Σ_heads Σ_i g_i σ(u_i · x) v_i`` with PyTorch gathers: the reference."""
        N = u_ND.shape[0]
        # σ(u_i · x) for the retrieved experts only: gather (N, H, k, D), never (N, num_experts).
        u_NHkD = F.embedding(idx_NHk, self.expert_in)
        act_NHk = torch.einsum("nhkd,nd->nhk", u_NHkD.to(u_ND.dtype), u_ND)
        act_NHk = F.gelu(act_NHk) if self.config.activation == "gelu" else F.relu(act_NHk)
        if wants(stats, Activations):  # σ(u_i·x), and g_i σ(u_i·x) on v_i
            stats.add(Activations.of(act_NHk, gates_NHk * act_NHk))
        # Σ g_i σ(·) v_i as a weighted bag: no (N, H, k, D) copy of v is materialised.
        weights_NS = (gates_NHk * act_NHk).reshape(N, -1)
        return F.embedding_bag(idx_NHk.reshape(N, -1), self.expert_out,
                               per_sample_weights=weights_NS.to(self.expert_out.dtype), mode="sum")

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.retrieval.init_weights(std)
        nn.init.normal_(self.expert_in, std=std)
        nn.init.normal_(self.expert_out, std=out_std)
