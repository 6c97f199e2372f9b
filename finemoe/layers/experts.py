"""A bank of SwiGLU experts, the token dispatch that feeds it, and the one place that
chooses how experts run.

Dispatch is sort-based: every (token, expert) slot is sorted by expert, the tokens
are gathered into one contiguous ``(S, D)`` buffer, the experts run on their
contiguous row groups (each row's routing weight applied to its hidden units), and
the results are summed back per token: from their rows for token choice
(``finemoe.kernels.sum_slots``: a permutation, no atomic adds), with ``index_add_`` for
expert choice, where a token has any number of slots. Nothing leaves the device: group
sizes are read off the sorted expert ids with ``searchsorted`` (``bincount`` would size
its output on the host), so the dispatch compiles with ``fullgraph=True``.

How the experts run on their row groups is one choice (``experts_impl``), as in
torchtitan (``use_grouped_mm``) and Hugging Face (``experts_implementation``):

- ``eager``: one GEMM per expert, after ``counts.tolist()`` sizes the slices. The
  readable reference; it synchronises with the host once per call and breaks a
  compiled graph.
- ``grouped_mm`` (and ``auto``, the default): ``finemoe.kernels.grouped_mm``, two
  grouped GEMMs for all experts (gate and up projections side by side, then down;
  PyTorch's CUTLASS kernel on CUDA in bf16), group offsets on the device, one opaque op
  to ``torch.compile``. Where that
  kernel does not apply (float64, float32 on a GPU, an old torch) the op loops over
  the groups inside itself, so a model still compiles with ``fullgraph=True``.
- ``quack``: token choice on QuACK's grouped GEMMs (``finemoe.kernels.quack_experts``,
  SonicMoE's layout: the slot gather inside the GEMMs, SwiGLU in their epilogues, float32
  weight gradients), where the optional ``quack-kernels`` package is installed and the
  GPU is an sm90/sm100 one; the grouped_mm path elsewhere (expert choice, recording
  activations, float32, the CPU). Opt-in: its GEMMs are autotuned on first use, and it
  pays under CUDA-graph replay (its launches cost host time: benchmarks/NOTES.md).

Shapes: N tokens, S routed slots (N·K for token choice, E·C for expert choice),
D model width, F expert width, E experts.
"""

from __future__ import annotations

import typing
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from finemoe.config import check
from finemoe.kernels import grouped_mm
from finemoe.kernels.quack_experts import quack_available, quack_installed, quack_token_choice
from finemoe.kernels.slots import gather_rows, sum_slots
from finemoe.layers.common import interleave_gate_up, split_gate_up, swiglu_hidden, swiglu_hidden_packed
from finemoe.layers.records import Stats
from finemoe.layers.routing import counts_of_sorted, sort_by_expert

__all__ = [
    "EXPERTS_IMPLS",
    "ExpertsImpl",
    "SwiGLUExperts",
    "check_shared_experts",
    "compute_dtype",
    "dispatch_expert_choice",
    "dispatch_token_choice",
    "run_swiglu_experts",
    "shared_experts_width",
]

ExpertsImpl = Literal["auto", "eager", "grouped_mm", "quack"]
EXPERTS_IMPLS = typing.get_args(ExpertsImpl)


def shared_experts_width(config) -> int:
    """Total width of a routed layer's shared experts (``num_shared_experts`` of width
    ``shared_expert_intermediate_size``, default the routed expert width): always active,
    they run as one SwiGLU MLP of that width."""
    return config.num_shared_experts * (config.shared_expert_intermediate_size or config.expert_intermediate_size)


def check_shared_experts(config) -> None:
    """Validate the shared-expert fields that ``moe``, ``hash`` and ``topp`` have in common."""
    check(config.num_shared_experts >= 0, "num_shared_experts", f"must be >= 0, got {config.num_shared_experts}")
    if config.shared_expert_intermediate_size is not None:
        check(config.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size", "must be positive")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matrix product of ``x`` runs in: the autocast dtype if autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def run_swiglu_experts(
    x_SD: Tensor,
    counts_E: Tensor,
    w_gate_up: Tensor | tuple[Tensor, Tensor],
    w_down_EFD: Tensor,
    *,
    scale_S: Tensor | None = None,
    impl: str = "auto",
    stats: Stats | None = None,
) -> Tensor:
    """Expert e computes ``SwiGLU_e(x) = (silu(x W_g,e) ⊙ (x W_u,e)) W_d,e`` on rows
    ``[offset_e, offset_e + counts_E[e])`` of ``x_SD`` (rows grouped by expert, groups
    in expert order, possibly empty), each row's result times ``scale_S`` if given (a
    routing weight: applied to the hidden units, where the fused SwiGLU kernel takes it
    for free, which by linearity is the same). Returns ``(S, D)``.

    ``w_gate_up``: the gate and up projections as one interleaved ``(E, D, 2F)`` bank
    (``SwiGLUExperts.w_gate_up``), or as a pair of ``(E, D, F)`` tensors, which may be
    strided views (DSMoE runs the blocks of a dense FFN this way). ``stats``: where the
    experts' activations are recorded, when the caller wants them."""
    scale_S1 = None if scale_S is None else scale_S.reshape(-1, 1)
    if impl in ("auto", "grouped_mm", "quack"):
        return _run_grouped_mm(x_SD, counts_E, w_gate_up, w_down_EFD, scale_S1, stats)
    if impl == "eager":
        w_gate_EDF, w_up_EDF = w_gate_up if isinstance(w_gate_up, tuple) else split_gate_up(w_gate_up)
        return _run_loop(x_SD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD, scale_S1, stats)
    raise ValueError(f"unknown experts implementation {impl!r}; one of {', '.join(EXPERTS_IMPLS)}")


def _run_loop(x_SD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD, scale_S1, stats) -> Tensor:
    """The reference: one GEMM per expert on its slice."""
    splits = counts_E.tolist()  # host sync: sizes the slices
    scales = torch.split(scale_S1, splits) if scale_S1 is not None else [None] * len(splits)
    outputs = []
    for e, (x_cD, scale_c1) in enumerate(zip(torch.split(x_SD, splits), scales)):
        if x_cD.shape[0] == 0:
            continue
        hidden_cF = swiglu_hidden(x_cD @ w_gate_EDF[e], x_cD @ w_up_EDF[e], stats, block_scale=scale_c1)
        outputs.append(hidden_cF @ w_down_EFD[e])
    if not outputs:
        return x_SD.new_zeros(x_SD.shape[0], w_down_EFD.shape[-1])
    return torch.cat(outputs, dim=0)


def _run_grouped_mm(x_SD, counts_E, w_gate_up, w_down_EFD, scale_S1, stats) -> Tensor:
    """Two grouped GEMMs in the compute dtype, the gate and up projections as one of
    twice the width: the interleaved bank as it is stored (SwiGLU reads its output's even
    and odd columns), or a pair placed side by side (copied once, as the cast to the
    compute dtype copies them anyway); group ends are the cumulative counts."""
    dtype = compute_dtype(x_SD)
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    interleaved = not isinstance(w_gate_up, tuple)
    w_ED2F = w_gate_up.to(dtype) if interleaved else torch.cat([w.to(dtype) for w in w_gate_up], dim=-1)
    hidden_SF = swiglu_hidden_packed(grouped_mm(x_SD.to(dtype), w_ED2F, offs_E), stats, block_scale=scale_S1,
                                     interleaved=interleaved)
    return grouped_mm(hidden_SF, w_down_EFD.to(dtype), offs_E)


class SwiGLUExperts(nn.Module):
    """E independent SwiGLU experts of width F, stored as stacked weights.

    ``w_gate_up``: ``(E, D, 2F)``, expert e's gate column j at column 2j and its up
    column j at 2j + 1 (``interleave_gate_up``); ``w_gate``/``w_up`` are its ``(E, D, F)``
    views; ``w_down``: ``(E, F, D)``. One interleaved tensor because QuACK's gated GEMMs
    pair columns that way: their weight gradient is the parameter's gradient as written,
    where two banks cost a pass that split it (moe E = 64: 179 µs a step,
    benchmarks/NOTES.md). Checkpoints written before this layout (``w_gate`` and ``w_up``
    apart) still load.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.num_experts, self.d_model, self.hidden, self.impl = num_experts, d_model, hidden, impl
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.register_load_state_dict_pre_hook(_interleave_legacy_gate_up)
        self.init_weights(std=0.02, out_std=0.02)  # usable standalone; the model re-initialises

    @property
    def w_gate(self) -> Tensor:
        return split_gate_up(self.w_gate_up)[0]

    @property
    def w_up(self) -> Tensor:
        return split_gate_up(self.w_gate_up)[1]

    def forward(self, x_SD: Tensor, counts_E: Tensor, scale_S: Tensor | None = None,
                stats: Stats | None = None) -> Tensor:
        """Run expert e on rows ``[offset_e, offset_e + counts_E[e])`` of ``x_SD``
        (rows sorted by expert), each result times ``scale_S``. Returns ``(S, D)``."""
        return run_swiglu_experts(x_SD, counts_E, self.w_gate_up, self.w_down, scale_S=scale_S, impl=self.impl,
                                  stats=stats)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for half in split_gate_up(self.w_gate_up):  # drawn as two banks, as before the interleaved layout
            half.copy_(nn.init.normal_(torch.empty_like(half, memory_format=torch.contiguous_format), std=std))
        nn.init.normal_(self.w_down, std=out_std)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, impl={self.impl}"


def _interleave_legacy_gate_up(module, state_dict, prefix, *args) -> None:
    """A checkpoint of the earlier layout holds ``w_gate`` and ``w_up`` as two ``(E, D, F)``
    tensors: load them as ``w_gate_up``. (Such a checkpoint's optimizer state counts one
    parameter more and does not load: its run cannot be resumed, only read.)"""
    gate, up = prefix + "w_gate", prefix + "w_up"
    if gate in state_dict and up in state_dict and prefix + "w_gate_up" not in state_dict \
            and state_dict[gate].shape == state_dict[up].shape and state_dict[gate].dim() == 3:
        state_dict[prefix + "w_gate_up"] = interleave_gate_up(state_dict.pop(gate), state_dict.pop(up))


class _GatherSlots(torch.autograd.Function):
    """``x_ND[order_S // K]``: each token's row once per slot, slots in expert order.

    The backward sums each token's K slot gradients with ``sum_slots`` (the rows are a
    permutation of the slots: one pass, fixed order, no atomic adds), where the backward
    of plain advanced indexing would sort and accumulate."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, order_S: Tensor, position_S: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(order_S, position_S)
        ctx.K = K
        return gather_rows(x_ND, torch.div(order_S, K, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_SD: Tensor):
        order_S, position_S = ctx.saved_tensors
        return sum_slots(grad_SD, position_S, order_S, ctx.K), None, None, None


def dispatch_token_choice(experts: SwiGLUExperts, x_ND: Tensor, weights_NK: Tensor, idx_NK: Tensor,
                          stats: Stats | None = None) -> Tensor:
    """``y_n = Σ_k weights[n, k] · expert_{idx[n, k]}(x_n)``, dropless.

    Slot ``n·K + k`` is row ``position[n·K + k]`` of the sorted buffer (row p holds slot
    ``order[p]``). The weights are applied inside the experts; each token's K results
    are summed from their rows by ``sum_slots``: deterministic, no atomic adds."""
    N, K = idx_NK.shape
    x_ND = x_ND.to(compute_dtype(x_ND))                        # gather half the bytes under autocast
    sorted_ids_S, order_S = sort_by_expert(idx_NK, experts.num_experts)  # slots grouped by expert
    position_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(order_S.numel(), device=order_S.device))
    counts_E = counts_of_sorted(sorted_ids_S, experts.num_experts)
    if _runs_on_quack(experts.impl, x_ND, stats):
        token_S = torch.div(order_S, K, rounding_mode="floor")
        return quack_token_choice(x_ND, experts.w_gate_up, experts.w_down, weights_NK, token_S, position_S, order_S,
                                  counts_E)
    y_SD = experts(_GatherSlots.apply(x_ND, order_S, position_S, K), counts_E, weights_NK.reshape(-1)[order_S], stats)
    return sum_slots(y_SD, position_S, order_S, K)


def _runs_on_quack(impl: str, x_ND: Tensor, stats: Stats | None) -> bool:
    """Whether token choice runs on QuACK's kernels (``finemoe.kernels.quack_experts``):
    asked for, in bf16 on an sm90/sm100 GPU, and no activations to record (the kernels
    never write the hidden units out)."""
    if impl != "quack" or stats is not None or x_ND.dtype != torch.bfloat16 or not x_ND.is_cuda:
        return False
    if not quack_installed():
        warnings.warn("experts_impl='quack' needs the quack-kernels package (pip install 'finemoe[quack]'); "
                      "running the grouped_mm path instead", stacklevel=3)
    return quack_available(x_ND)


def dispatch_expert_choice(experts: SwiGLUExperts, x_ND: Tensor, weights_EC: Tensor, idx_EC: Tensor,
                           stats: Stats | None = None) -> Tensor:
    """``y_n = Σ_{e: n ∈ chosen(e)} weights[e, n] · expert_e(x_n)``; tokens no expert
    chose get zero update."""
    E, C = idx_EC.shape
    token_S = idx_EC.reshape(-1)                               # already grouped by expert
    counts_E = torch.full((E,), C, dtype=torch.long, device=x_ND.device)
    y_SD = experts(x_ND[token_S], counts_E, weights_EC.reshape(-1), stats)
    return x_ND.new_zeros(x_ND.shape).index_add_(0, token_S, y_SD.to(x_ND.dtype))
