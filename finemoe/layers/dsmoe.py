"""``dsmoe``: matrix-partitioned experts with dynamic routing (arXiv 2502.12455),
as specified in METHODS.md §2.

A (pre-trained) SwiGLU FFN is split into n contiguous blocks — W_g, W_u by columns,
W_d by rows — so that with every block on, ``Σ_i o_i(u)`` is the dense FFN exactly:

    o_i(u) = (silu(u W_{g,i}) ⊙ (u W_{u,i})) W_{d,i}
    a_i    = sigmoid(u Y_i)                         Y ∈ R^{D×n}, fresh, no bias
    G(a)   = a if a > τ else 0                      hard threshold, τ = 0.5
    S(a)   = stopgrad(G(a)) + a − stopgrad(a)       straight-through estimator
    h      = Σ_i o_i · S(a_i) · n / #{i: a_i > τ}   dropout-like rescaling (0 active → 0)

Forward value = thresholded gate; backward = gradient of the plain sigmoid, so Y gets
gradient through every block, active or not, and an inactive block's weights get none.
Training therefore computes every block; in eval mode the layer can skip inactive
blocks (``eval_sparse``), which gives the same output.

Sparsity loss: ``λ · 1/(L·n) · Σ_layers Σ_i G(a_i)``, averaged over tokens; each of the
L DSMoE layers contributes its share ``λ/(L·n) · Σ_i G(a_i)``. Its gradient is that of
G as written (through the active gates only).

Shapes: N tokens, D model width, n blocks ("experts"), F FFN width, b = F/n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from finemoe.config import ConfigError, check
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Activations, BlockActivity, wants
from finemoe.layers.common import (RMSNorm, SwiGLU, dense_swiglu_weights, float32_linear, fresh_gate,
                                   swiglu_hidden, swiglu_params)
from finemoe.kernels import triton_kernels_available
from finemoe.kernels.dsmoe_decode import dsmoe_decode, dsmoe_decode_applies
from finemoe.kernels.dsmoe_prefill import block_pairs, norm_and_gates
from finemoe.kernels.gathered_swiglu import gathered_swiglu, gathered_swiglu_applies
from finemoe.kernels.grouped_mm import grouped_mm
from finemoe.kernels.slots import sum_listed_rows
from finemoe.layers.experts import ExpertsImpl, compute_dtype, run_swiglu_experts
from finemoe.layers.routing import count_per_expert


@register_ffn
@dataclass
class DSMoEConfig(FFNConfig):
    kind: ClassVar[str] = "dsmoe"
    intermediate_size: int = 1024
    """F: width of the partitioned dense FFN."""
    num_experts: int = 8
    """n: contiguous blocks of width F/n (the paper uses 8)."""
    threshold: float = 0.5
    """τ of the hard gate."""
    straight_through: bool = True
    """False: the no-STE ablation, training with the hard gate G(a) itself."""
    rescale: bool = True
    """Multiply by n / #active, like inverted dropout."""
    sparsity_loss_coef: float = 1.0
    """λ [choice; the paper uses 1]."""
    eval_sparse: bool = True
    """In eval mode compute only the active blocks of each token."""
    experts_impl: ExpertsImpl = "auto"
    """How the active blocks run in sparse inference (see ``finemoe.layers.experts``)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check(self.intermediate_size > 0, "intermediate_size", "must be positive")
        check(self.num_experts > 0, "num_experts", "must be positive")
        check(
            self.intermediate_size % self.num_experts == 0,
            "num_experts",
            f"intermediate_size ({self.intermediate_size}) is not divisible by num_experts ({self.num_experts})",
        )
        check(0.0 <= self.threshold < 1.0, "threshold", f"must be in [0, 1) (a sigmoid output), got {self.threshold}")
        check(self.sparsity_loss_coef >= 0, "sparsity_loss_coef", "must be >= 0")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    @property
    def block_width(self) -> int:
        return self.intermediate_size // self.num_experts

    def measured_active_share(self, layer_summary):
        blocks = layer_summary.get(BlockActivity.name)
        return blocks["active_share"] if blocks else None

    def measured_cost(self, layer_summary, d_model):
        """Only the blocks switched on are computed (the sparse inference path)."""
        share = self.measured_active_share(layer_summary)
        skipped = 0.0 if share is None else (1 - share) * swiglu_params(d_model, self.intermediate_size)
        return self.num_active_params(d_model) - skipped, self.flops_per_token(d_model) - 2 * skipped

    conversion_note: ClassVar[str] = ("DSMoE counts every block: the share switched on is learned per token; "
                                      "`finemoe analyze` measures it")

    @classmethod
    def from_dense(cls, dense, *, num_experts: int = 8, threshold: float = 0.5, straight_through: bool = True,
                   sparsity_loss_coef: float = 1.0, **_) -> "DSMoEConfig":
        """The paper's conversion: the dense FFN's hidden units cut into ``num_experts``
        contiguous blocks, each switched by a fresh sigmoid gate."""
        return cls(intermediate_size=dense.intermediate_size, num_experts=num_experts, threshold=threshold,
                   straight_through=straight_through, sparsity_loss_coef=sparsity_loss_coef, norm_eps=dense.norm_eps)

    def weights_from_dense(self, dense_sd, *, generator=None):
        w_g, w_u, w_d = dense_swiglu_weights(dense_sd)
        if self.intermediate_size != w_g.shape[0]:
            raise ConfigError("intermediate_size", f"is {self.intermediate_size}, the dense FFN has {w_g.shape[0]}")
        # the blocks are contiguous slices, so the dense matrices are the DSMoE matrices
        return {"norm.weight": dense_sd["norm.weight"], "mlp.gate_proj.weight": w_g, "mlp.up_proj.weight": w_u,
                "mlp.down_proj.weight": w_d, "gate.weight": fresh_gate(self.num_experts, w_g.shape[1], w_g, generator)}

    def build(self, d_model: int, context: LayerContext | None = None) -> "DSMoEFFN":
        return DSMoEFFN(self, d_model, (context or LayerContext()).n_layers_of_kind)

    def num_params(self, d_model: int) -> int:
        return d_model + d_model * self.num_experts + swiglu_params(d_model, self.intermediate_size)

    def num_active_params(self, d_model: int) -> int:
        """The maximum (every block on); the measured share comes from ``active_share`` stats."""
        return self.num_params(d_model)

    def flops_per_token(self, d_model: int) -> int:
        """Dense cost (training computes every block); sparse inference spends
        ``2·D·n + active_share · 2·3·D·F``."""
        return 2 * (d_model * self.num_experts + swiglu_params(d_model, self.intermediate_size))


class DSMoEFFN(FFN):
    def __init__(self, config: DSMoEConfig, d_model: int, n_layers_of_kind: int = 1):
        super().__init__()
        self.config = config
        self.n_layers_of_kind = n_layers_of_kind
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.mlp = SwiGLU(d_model, config.intermediate_size)  # the dense FFN, blocks contiguous
        self.gate = nn.Linear(d_model, config.num_experts, bias=False)  # Y
        self.init_weights(std=0.02, out_std=0.02)

    def gates(self, u_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, G(a), active)`` in float32: sigmoid gates, thresholded gates, mask."""
        a_Nn = torch.sigmoid(float32_linear(u_ND, self.gate.weight))
        active_Nn = a_Nn > self.config.threshold
        return a_Nn, a_Nn * active_Nn, active_Nn

    def _scale(self, active_Nn: Tensor, dtype: torch.dtype) -> Tensor:
        """``n / #active`` per token (0 when nothing is active), shape ``(N, 1)``."""
        if not self.config.rescale:
            return torch.ones_like(active_Nn[:, :1], dtype=dtype)
        count_N1 = active_Nn.sum(-1, keepdim=True).to(dtype)
        return torch.where(count_N1 > 0, self.config.num_experts / count_N1.clamp_min(1), torch.zeros_like(count_N1))

    def masked_forward(self, u_ND: Tensor, a_Nn: Tensor, G_Nn: Tensor, active_Nn: Tensor,
                       stats: Stats | None = None) -> Tensor:
        """Every block computed, then weighted (training, and the reference for eval)."""
        cfg = self.config
        S_Nn = G_Nn.detach() + a_Nn - a_Nn.detach() if cfg.straight_through else G_Nn
        weights_Nn = S_Nn * self._scale(active_Nn, S_Nn.dtype)
        # Σ_i o_i · w_i = (hidden ⊙ w_i on block i's columns) W_d: one GEMM
        weighted_NF = swiglu_hidden(self.mlp.gate_proj(u_ND), self.mlp.up_proj(u_ND), stats, block_scale=weights_Nn)
        return self.mlp.down_proj(weighted_NF)

    def block_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The n blocks of the dense FFN as an expert bank, views of its weights:
        ``(n, D, b)`` gate and up, ``(n, b, D)`` down."""
        n, b = self.config.num_experts, self.config.block_width
        D = self.mlp.gate_proj.weight.shape[1]
        w_gate = self.mlp.gate_proj.weight.view(n, b, D).transpose(1, 2)
        w_up = self.mlp.up_proj.weight.view(n, b, D).transpose(1, 2)
        w_down = self.mlp.down_proj.weight.view(D, n, b).permute(1, 2, 0)
        return w_gate, w_up, w_down

    def sparse_forward(self, u_ND: Tensor, G_Nn: Tensor, active_Nn: Tensor, stats: Stats | None = None) -> Tensor:
        """Only the active (token, block) pairs are computed (inference): they run as a
        bank of n experts, the blocks, each on the tokens that switched it on, and each
        token sums its blocks' outputs. Nothing synchronises with the host: the pairs
        are laid out in a buffer of all n·N possible ones, the active first, and only
        those rows are computed (``_sparse_forward_reference`` sizes the work exactly,
        with one host sync). On a GPU in half precision it runs in kernels
        (``_sparse_blocks``)."""
        if self.config.experts_impl == "eager" or wants(stats, Activations):  # rows past the active pairs are not
            return self._sparse_forward_reference(u_ND, G_Nn, active_Nn, stats)  # computed: nothing to record there
        x_ND = u_ND.to(compute_dtype(u_ND))
        if not torch.is_grad_enabled() and gathered_swiglu_applies(x_ND.device, x_ND.dtype, x_ND.shape[1],
                                                                    self.config.block_width):
            return self._sparse_blocks(x_ND, G_Nn)
        weights_Nn = G_Nn * self._scale(active_Nn, G_Nn.dtype)
        token_S, scale_S, position_Nn, counts_n = _active_pairs_first(active_Nn, weights_Nn)
        w_gate, w_up, w_down = self.block_weights()
        y_SD = run_swiglu_experts(x_ND[token_S], counts_n, (w_gate, w_up), w_down, scale_S=scale_S,
                                  impl=self.config.experts_impl)
        return sum_listed_rows(y_SD, position_Nn)

    def _sparse_blocks(self, x_ND: Tensor, G_Nn: Tensor) -> Tensor:
        """``sparse_forward`` in kernels: the layout of the pairs
        (``finemoe.kernels.dsmoe_prefill``), the gathered gate and up products with the
        SwiGLU (``finemoe.kernels.gathered_swiglu``), the down products (torch's grouped
        GEMM), and each token's sum over its blocks (``finemoe.kernels.slots``)."""
        w_gate, w_up, w_down = self.block_weights()
        token_S, scale_S, position_Nn, counts_n, ends_n = block_pairs(G_Nn, self.config.rescale)
        hidden_Sb = gathered_swiglu(x_ND, token_S, scale_S, counts_n, w_gate, w_up)
        return sum_listed_rows(grouped_mm(hidden_Sb, w_down.to(x_ND.dtype), ends_n), position_Nn)

    def _prefilling(self, h_ND: Tensor, stats: Stats | None) -> bool:
        """Inference on a GPU in half precision (bf16 autocast) for more tokens than
        decoding: the whole sparse path in kernels, from the norm and the gates
        (``finemoe.kernels.dsmoe_prefill``) to the per-token sums, with no host sync
        (a CUDA graph can capture it)."""
        return (self._inference_in_kernels(h_ND, stats) and self.config.experts_impl != "eager"
                and gathered_swiglu_applies(h_ND.device, compute_dtype(h_ND), h_ND.shape[1], self.config.block_width))

    def _inference_in_kernels(self, h_ND: Tensor, stats: Stats | None) -> bool:
        """Eval mode with the sparse path, no gradients, no activations to record, on a
        device where finemoe's Triton kernels run."""
        return (not self.training and self.config.eval_sparse and not torch.is_grad_enabled()
                and not wants(stats, Activations) and triton_kernels_available(h_ND))

    def _sparse_forward_reference(self, u_ND: Tensor, G_Nn: Tensor, active_Nn: Tensor,
                                  stats: Stats | None = None) -> Tensor:
        """``sparse_forward`` sized exactly: the active pairs listed by ``nonzero`` (one
        host sync), gathered, run as the block bank, and added back per token."""
        N, n = active_Nn.shape
        weights_Nn = G_Nn * self._scale(active_Nn, G_Nn.dtype)
        # Pairs numbered block·N + token, so nonzero returns them grouped by block.
        pair_S = active_Nn.t().reshape(-1).nonzero().squeeze(-1)
        block_S, token_S = pair_S // N, pair_S % N
        x_SD = u_ND.to(compute_dtype(u_ND))[token_S]
        w_gate, w_up, w_down = self.block_weights()
        y_SD = run_swiglu_experts(x_SD, count_per_expert(block_S, n), (w_gate, w_up), w_down,
                                  scale_S=weights_Nn[token_S, block_S], impl=self.config.experts_impl, stats=stats)
        return u_ND.new_zeros(u_ND.shape).index_add_(0, token_S, y_SD.to(u_ND.dtype))

    def _decoding(self, h_ND: Tensor, stats: Stats | None = None) -> bool:
        """A few tokens at inference on a GPU: the decode kernels, which read only the
        switched-on blocks' weights (``finemoe.kernels.dsmoe_decode``)."""
        return self._inference_in_kernels(h_ND, stats) and dsmoe_decode_applies(h_ND, self.config.block_width)

    def supported_interventions(self) -> tuple[str, ...]:
        """``all_blocks_on``: every block on with weight 1 and no rescaling — exactly the
        dense FFN the layer was split from (a check of a conversion, and the upper end
        of the active-share axis)."""
        return ("all_blocks_on",)

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        cfg = self.config
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D)
        if self.intervening("all_blocks_on"):  # every block on with weight 1: the dense FFN it was split from
            y_ND = self.mlp(self.norm(h_ND), stats)
            G_Nn = torch.ones(B * T, cfg.num_experts, device=h_ND.device)
            active_Nn = G_Nn.bool()
        elif self._decoding(h_ND, stats):
            y_ND, G_Nn = dsmoe_decode(self.norm(h_ND), self.gate.weight, self.mlp.gate_proj.weight,
                                      self.mlp.up_proj.weight, self.mlp.down_proj.weight, threshold=cfg.threshold,
                                      rescale=cfg.rescale)
            active_Nn = G_Nn > 0
        elif self._prefilling(h_ND, stats):
            x_ND, G_Nn = norm_and_gates(h_ND, self.norm.weight, self.gate.weight, cfg.norm_eps, cfg.threshold,
                                        compute_dtype(h_ND))
            y_ND, active_Nn = self._sparse_blocks(x_ND, G_Nn), G_Nn > 0
        else:
            u_ND = self.norm(h_ND)
            a_Nn, G_Nn, active_Nn = self.gates(u_ND)
            if not self.training and cfg.eval_sparse:
                y_ND = self.sparse_forward(u_ND, G_Nn, active_Nn, stats)
            else:
                y_ND = self.masked_forward(u_ND, a_Nn, G_Nn, active_Nn, stats)
        aux = {}
        if cfg.sparsity_loss_coef > 0:
            per_token = G_Nn.sum(-1).mean()  # Σ_i G(a_i), averaged over tokens
            aux["sparsity"] = cfg.sparsity_loss_coef * per_token / (self.n_layers_of_kind * cfg.num_experts)
        if stats is not None:
            stats.add(BlockActivity.of(active_Nn))
        return FFNOutput(update=y_ND.reshape(B, T, D), aux_losses=aux)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        self.mlp.init_weights(std, out_std)
        nn.init.normal_(self.gate.weight, std=std)


def _active_pairs_first(active_Nn: Tensor, weights_Nn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The n·N (token, block) pairs, numbered q = block·N + token, laid out with the
    active pairs first, grouped by block (their rank among the active pairs in q order),
    then the inactive ones. Returns each row's token and weight ``(n·N,)``, each pair's
    row ``(N, n)`` (-1 where inactive) and the active pairs per block ``(n,)``. Cumulative
    sums on the device, no sort, no host sync (``finemoe.kernels.dsmoe_prefill`` does the
    same in one kernel)."""
    N, n = active_Nn.shape
    active_q = active_Nn.t().reshape(-1)
    q = torch.arange(n * N, device=active_Nn.device)
    rank_q = torch.cumsum(active_q, 0) - 1                  # active pairs up to q, minus one
    counts_n = active_Nn.sum(0)
    # an inactive pair goes after all active ones, at its rank among the inactive
    row_q = torch.where(active_q, rank_q, counts_n.sum() + q - rank_q - 1)
    token_S = torch.empty_like(q).scatter_(0, row_q, q % N)
    scale_S = torch.empty_like(weights_Nn.reshape(-1)).scatter_(0, row_q, weights_Nn.t().reshape(-1))
    position_Nn = torch.where(active_q, rank_q, -1).view(n, N).t().contiguous()
    return token_S, scale_S, position_Nn, counts_n
