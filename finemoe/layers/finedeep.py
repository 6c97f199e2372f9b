"""``finedeep``: multi-layer fine-grained experts in a dense model (arXiv 2502.12928),
as specified in METHODS.md §1 (reconstructed: the paper's full text was not available).

The dense FFN of width F becomes M·K SwiGLU experts of width f = F/(M·K), arranged as
M sequential sub-layers of K experts. Every expert is active (no top-k): parameters
and FLOPs match the dense FFN up to the tiny routers and norms. Sub-layer m:

    u   = RMSNorm_m(h_{m-1})
    e_k = E_{m,k}(u)                                  k = 1..K
    s_k = sigmoid(w_{m,k} · e_k)                      "output-guided" routing
    g_k = s_k / Σ_j s_j                               (``normalize``, default on;
                                                       ``gate_sum="experts"``: K·s_k / Σ_j s_j)
    h_m = h_{m-1} + Σ_k g_k e_k

``h_0`` is the block's input to the FFN and ``h_M`` replaces "input + FFN output", so
the layer returns ``h_M − h_0`` as its update.

Ablation options: ``router_input = "sublayer_input"`` scores ``s = sigmoid(u W_r)``;
``gate = "softmax"`` replaces sigmoid (+normalisation) by a softmax over the K scores.

Shapes: N tokens, D model width, M sub-layers, K experts per sub-layer, f expert width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from finemoe.config import ConfigError, check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Activations, Gates, wants
from finemoe.layers.common import (RMSNorm, at_least_float32, dense_swiglu_weights, float32_linear, swiglu_hidden,
                                   swiglu_params)
from finemoe.kernels import triton_kernels_available
from finemoe.kernels.finedeep_gate import finedeep_swiglu_gate, swiglu_gate_applies
from finemoe.layers.dense import DenseConfig


@register_ffn
@dataclass
class FinedeepConfig(FFNConfig):
    kind: ClassVar[str] = "finedeep"
    num_sublayers: int = 2
    """M: sequential sub-layers, each with its own RMSNorm and residual."""
    experts_per_sublayer: int = 4
    """K: experts per sub-layer, all active."""
    expert_intermediate_size: int = 128
    """f = F/(M·K) for a Finedeep layer matching a dense FFN of width F."""
    router_input: Literal["expert_output", "sublayer_input"] = "expert_output"
    normalize: bool = True
    """g_k = s_k / Σ_j s_j (sigmoid gate only)."""
    gate: Literal["sigmoid", "softmax"] = "sigmoid"
    gate_sum: Literal["one", "experts"] = "one"
    """What normalised (or softmax) gates sum to: 1, a weighted average of the K experts
    (the spec), or K, so that equal gates give the plain sum of the experts, i.e. the
    dense FFN they were cut from (an average is ~1/K of it: see results/study_finedeep)."""
    gate_kernel: bool = True
    """On a GPU, SwiGLU, scores, gates and the gated hidden units in one Triton kernel
    (``finemoe.kernels.finedeep_gate``; output-guided routing, K·f ≤ 8,192 after
    padding, activations not being recorded); false: the PyTorch path, the readable
    reference (and the path on a CPU). On by measurement: less GPU time per forward +
    backward compiled, in one process (benchmarks/NOTES.md)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_sublayers", "experts_per_sublayer", "expert_intermediate_size"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(self.norm_eps > 0, "norm_eps", "must be positive")
        check(self.gate_sum == "one" or self.normalize or self.gate == "softmax", "gate_sum",
              "applies to normalised or softmax gates; set normalize=true or gate=softmax")

    @classmethod
    def matching_dense(cls, dense: DenseConfig, num_sublayers: int, experts_per_sublayer: int, **options) -> "FinedeepConfig":
        """The Finedeep layer cut from a dense FFN of width F: M·K experts of width F/(M·K).
        Parameters and FLOPs then equal the dense FFN's up to M·K·D router weights and
        (M−1)·D norm weights (see ``relative_overhead``)."""
        experts = num_sublayers * experts_per_sublayer
        if dense.intermediate_size % experts:
            raise ConfigError(
                "experts_per_sublayer",
                f"the dense width {dense.intermediate_size} is not divisible by M·K = {experts}",
            )
        return cls(
            num_sublayers=num_sublayers,
            experts_per_sublayer=experts_per_sublayer,
            expert_intermediate_size=dense.intermediate_size // experts,
            norm_eps=dense.norm_eps,
            **options,
        )

    @property
    def total_width(self) -> int:
        return self.num_sublayers * self.experts_per_sublayer * self.expert_intermediate_size

    @classmethod
    def from_dense(cls, dense, *, num_experts: int = 8, num_sublayers: int = 1, **_) -> "FinedeepConfig":
        """The dense FFN's n blocks as M sub-layers of n/M experts, with zero routers and
        ``gate_sum = experts``, so every gate is exactly 1 at conversion: with M = 1 the
        layer is the dense FFN; with M > 1 the later sub-layers see the earlier ones'
        output, so it is not."""
        if num_experts % num_sublayers or dense.intermediate_size % num_experts:
            raise ConfigError("num_experts", f"{num_experts} blocks must split into {num_sublayers} sub-layers and "
                                             f"divide the dense width {dense.intermediate_size}")
        return cls(num_sublayers=num_sublayers, experts_per_sublayer=num_experts // num_sublayers,
                   expert_intermediate_size=dense.intermediate_size // num_experts, gate_sum="experts",
                   norm_eps=dense.norm_eps)

    def weights_from_dense(self, dense_sd, *, generator=None):
        w_g, w_u, w_d = dense_swiglu_weights(dense_sd)
        D = w_g.shape[1]
        M, K, f = self.num_sublayers, self.experts_per_sublayer, self.expert_intermediate_size
        if M * K * f != w_g.shape[0]:
            raise ConfigError("ffn", f"M·K·f = {M * K * f} must equal the dense width {w_g.shape[0]}")
        # sub-layer m takes blocks m·K … (m+1)·K − 1; each gets the dense FFN's norm; a zero
        # router gives equal sigmoid gates, which gate_sum = experts turns into exactly 1
        return {
            **{f"norms.{m}.weight": dense_sd["norm.weight"].clone() for m in range(M)},
            "w_gate": w_g.t().reshape(D, M, K * f).permute(1, 0, 2).contiguous(),  # (M, D, K·f)
            "w_up": w_u.t().reshape(D, M, K * f).permute(1, 0, 2).contiguous(),
            "w_down": w_d.t().reshape(M, K, f, D).contiguous(),
            "router": torch.zeros(M, K, D, dtype=w_g.dtype),
        }

    def build(self, d_model: int, context: LayerContext | None = None) -> "FinedeepFFN":
        return FinedeepFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        M, K = self.num_sublayers, self.experts_per_sublayer
        per_sublayer = d_model + K * d_model + K * swiglu_params(d_model, self.expert_intermediate_size)
        return M * per_sublayer

    def num_active_params(self, d_model: int) -> int:
        return self.num_params(d_model)  # a dense model: every expert is computed

    def flops_per_token(self, d_model: int) -> int:
        M, K = self.num_sublayers, self.experts_per_sublayer
        router = K * d_model  # w_{m,k}·e_k, or u W_r: K·D MACs either way
        return 2 * M * (router + K * swiglu_params(d_model, self.expert_intermediate_size))


class FinedeepFFN(FFN):
    def __init__(self, config: FinedeepConfig, d_model: int):
        super().__init__()
        self.config = config
        M, K, f = config.num_sublayers, config.experts_per_sublayer, config.expert_intermediate_size
        self.norms = nn.ModuleList(RMSNorm(d_model, config.norm_eps) for _ in range(M))
        # Expert k of sub-layer m owns columns [k·f, (k+1)·f) of w_gate[m] / w_up[m] and
        # rows k of w_down[m]: one GEMM computes all K experts' hidden units.
        self.w_gate = nn.Parameter(torch.empty(M, d_model, K * f))
        self.w_up = nn.Parameter(torch.empty(M, d_model, K * f))
        self.w_down = nn.Parameter(torch.empty(M, K, f, d_model))
        self.router = nn.Parameter(torch.empty(M, K, d_model))  # w_{m,k} (or the rows of W_r)
        self.init_weights(std=0.02, out_std=0.02)

    def sublayer(self, m: int, h_ND: Tensor, stats: Stats | None = None, gates: list | None = None,
                 plus: Tensor | None = None) -> Tensor:
        """The update ``Σ_k g_k e_k`` of sub-layer m (its ``(N, K)`` gates appended to
        ``gates`` if given), plus ``plus`` if given, added by the down product (``addmm``;
        ATen copies the addend into the output first, so this takes what a separate add
        takes, by measurement: benchmarks/NOTES.md).

        Never builds the ``(N, K, D)`` expert outputs: with e_k = hidden_k W_{d,k},
        the output-guided score is ``w_k · e_k = hidden_k · (W_{d,k} w_k)``, so all K
        scores are one thin GEMM of the hidden units with a block-diagonal ``(K·f, K)``
        read-out (the hidden units stay in the compute dtype; the GEMM accumulates in
        float32), and the weighted sum is one GEMM, ``(hidden ⊙ g) W_d`` (the naive
        per-expert form is the test reference). On a GPU the SwiGLU, the scores, the
        gates and the scaling are one kernel (``finemoe.kernels.finedeep_gate``); this
        PyTorch code is its reference.
        """
        cfg = self.config
        K, f = cfg.experts_per_sublayer, cfg.expert_intermediate_size
        N, D = h_ND.shape
        u_ND = self.norms[m](h_ND)
        gate_NF, up_NF = u_ND @ self.w_gate[m], u_ND @ self.w_up[m]
        if self._gate_kernel_applies(gate_NF, stats):
            weighted_NF, gates_NK = finedeep_swiglu_gate(gate_NF, up_NF, self._readout(m), softmax=cfg.gate == "softmax",
                                                         normalize=cfg.normalize,
                                                         scale=K if cfg.gate_sum == "experts" else 1.0)
        else:
            hidden_NF = swiglu_hidden(gate_NF, up_NF, stats)
            with torch.autocast(device_type=h_ND.device.type, enabled=False):
                if cfg.router_input == "expert_output":
                    eye_KK = torch.eye(K, dtype=self.router.dtype, device=h_ND.device)
                    readout_FK = (self._readout(m).unsqueeze(-1) * eye_KK.unsqueeze(1)).reshape(K * f, K)  # block-diagonal
                    scores_NK = at_least_float32(hidden_NF @ readout_FK.to(hidden_NF.dtype))
                else:
                    scores_NK = float32_linear(u_ND, self.router[m])
                if cfg.gate == "softmax":
                    gates_NK = torch.softmax(scores_NK, dim=-1)
                else:
                    gates_NK = torch.sigmoid(scores_NK)
                    if cfg.normalize:
                        gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
                if cfg.gate_sum == "experts":
                    gates_NK = gates_NK * K
            weighted_NF = (hidden_NF.view(N, K, f) * gates_NK.to(hidden_NF.dtype).unsqueeze(-1)).view(N, K * f)
        if gates is not None:
            gates.append(gates_NK.detach())
        w_down_FD = self.w_down[m].reshape(K * f, D)
        return weighted_NF @ w_down_FD if plus is None else torch.addmm(plus, weighted_NF, w_down_FD)

    def _readout(self, m: int) -> Tensor:
        """``r_k = W_{d,k} w_k`` of sub-layer m, ``(K, f)`` in float32: the output-guided
        score of expert k is ``hidden_k · r_k``. Written as a product and a sum rather
        than a matrix product: autocast leaves element-wise ops alone, so the backward
        stays float32 under ``torch.compile`` too (a product inside
        ``autocast(enabled=False)`` gets a bf16 backward there; Inductor fuses the two
        into one reduction)."""
        return (at_least_float32(self.w_down[m]) * at_least_float32(self.router[m]).unsqueeze(1)).sum(-1)

    def _gate_kernel_applies(self, gate_NF: Tensor, stats: Stats | None) -> bool:
        """The fused kernel on a GPU, unless the SwiGLU activations are being recorded
        (``finemoe analyze`` reads them from ``swiglu_hidden``) or a token's units
        overflow its register tile."""
        cfg = self.config
        return (cfg.gate_kernel and cfg.router_input == "expert_output" and triton_kernels_available(gate_NF)
                and not wants(stats, Activations)
                and swiglu_gate_applies(cfg.experts_per_sublayer, cfg.expert_intermediate_size))

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D)
        gates: list | None = [] if stats is not None else None
        # The layer's update h_M − h_0 is accumulated as Σ_m y_m (y_m = Σ_k g_k e_k of sub-layer m),
        # each term added by its down product, and sub-layer m + 1 reads h_m = h_0 + Σ_{j≤m} y_j.
        # Forming h_M and subtracting h_0 instead cancels the bits the update shares with h_0, and took
        # more GPU time (2 × 4: +55 µs; benchmarks/NOTES.md).
        update_ND = None
        for m in range(self.config.num_sublayers):
            x_ND = h_ND if update_ND is None else h_ND + update_ND
            update_ND = self.sublayer(m, x_ND, stats, gates, plus=update_ND)
        if stats is not None:
            stats.add(Gates.of(gates))
        return FFNOutput(update=update_ND.reshape(B, T, D))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for norm in self.norms:
            norm.reset_parameters()
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)
        nn.init.normal_(self.router, std=std)
