"""``moe``: the token-choice top-k MoE baseline (METHODS.md §0.2), with the options of
the Switch / GShard / Mixtral / DeepSeekMoE family.

    u = RMSNorm(h);  r = u W_r;  p = softmax(r)          (float32)
    token choice:   keep top-k of p per token; weights p_topk (renormalised if
                    ``norm_topk_prob``) — Mixtral, Jiang et al. 2024
    expert choice:  each expert keeps its top-C tokens (Zhou et al. 2022), the MoE
                    baseline of the PEER paper
    update = s · Σ_k g_k · SwiGLU_{e_k}(u) + Σ_shared SwiGLU_s(u)     (s: routed_scaling_factor)
    or, with ``shared_mix = "gate"``: c_0 · routed + c_1 · shared,  c = softmax(u W_c + b_c)

Fine-grained segmentation (DeepSeekMoE, Dai et al. 2024, §3.1): with ``granularity``
m, each of the E experts of width F_e is split into m experts of width F_e/m and the
router picks top-(k·m) of E·m, keeping parameters and FLOPs fixed.

Auxiliary losses: Switch load balancing ``α · E · Σ f_i P_i`` (token choice only;
expert choice is balanced by construction) and ST-MoE router z-loss
``β · mean(logsumexp(r)²)``. Dropless: every chosen (token, expert) pair is computed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from finemoe.config import ConfigError, check
from finemoe.layers import routing
from finemoe.layers.base import CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Stats, register_ffn
from finemoe.layers.records import Routing
from finemoe.layers.common import (RMSNorm, SwiGLU, dense_swiglu_weights, float32_linear, fresh_gate,
                                   interleave_gate_up, split_gate_up, swiglu_params)
from finemoe.layers.experts import (ExpertsImpl, SwiGLUExperts, check_shared_experts, dispatch_expert_choice,
                                     dispatch_token_choice, shared_experts_width)


@register_ffn
@dataclass
class MoEConfig(FFNConfig):
    kind: ClassVar[str] = "moe"
    num_experts: int = 8
    """E: experts before fine-grained segmentation."""
    num_experts_per_tok: int = 2
    """k: experts per token before segmentation (for expert choice: the mean)."""
    expert_intermediate_size: int = 512
    """F_e: width of one expert before segmentation."""
    granularity: int = 1
    """m: DeepSeekMoE segmentation factor; routes top-(k·m) of E·m experts of width F_e/m."""
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    """Width of each shared expert; default F_e."""
    shared_mix: Literal["add", "gate"] = "add"
    """How shared experts join the routed output: ``add`` (DeepSeekMoE), or ``gate``:
    ``c = softmax(u W_c + b_c)``, ``c_0 · routed + c_1 · shared`` (CartesianMoE's code)."""
    norm_topk_prob: bool = True
    """Renormalise the kept weights to sum to 1 (Mixtral). With k = 1 this makes the
    weight a constant 1 and the router learns only from the auxiliary losses, which is
    why Switch (top-1) keeps the raw probability: set it false for top-1."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed output (DeepSeek-V3's name); a dense FFN split into n
    experts with top-k gates summing to 1 needs n to keep its output scale."""
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    capacity_factor: float = 1.0
    """Expert choice only: each expert takes ceil(capacity_factor · N · k / E) tokens."""
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    disable_top1: bool = False
    """Routing-robustness test: every token's top-1 expert is disabled (METHODS.md §3).
    Also a run-time intervention (``finemoe.layers.intervention(model, "disable_top1")``),
    which is how ``finemoe analyze`` measures robustness without changing the config."""
    experts_impl: ExpertsImpl = "auto"
    """How the experts run (``finemoe.layers.experts``): ``eager`` (one GEMM per expert, the
    reference), ``grouped_mm`` (one grouped GEMM per projection), ``auto`` (the fastest
    this device, dtype and torch support)."""
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "expert_intermediate_size", "granularity"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(
            self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            f"{self.num_experts_per_tok} is larger than num_experts ({self.num_experts})",
        )
        check(
            self.expert_intermediate_size % self.granularity == 0,
            "granularity",
            f"expert_intermediate_size ({self.expert_intermediate_size}) is not divisible by granularity ({self.granularity})",
        )
        if self.disable_top1 and self.routing == "token_choice":
            check(
                self.routed_top_k < self.num_routed_experts,
                "disable_top1",
                f"needs more routed experts ({self.num_routed_experts}) than experts per token ({self.routed_top_k})",
            )
        check_shared_experts(self)
        check(
            self.shared_mix == "add" or self.num_shared_experts > 0,
            "shared_mix",
            "'gate' mixes in shared experts, but num_shared_experts is 0",
        )
        check(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        check(self.capacity_factor > 0, "capacity_factor", f"must be positive, got {self.capacity_factor}")
        check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        check(self.router_z_loss_coef >= 0, "router_z_loss_coef", "must be >= 0")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    # -- derived sizes ---------------------------------------------------------------
    @property
    def num_routed_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.num_experts_per_tok * self.granularity

    @property
    def routed_expert_width(self) -> int:
        return self.expert_intermediate_size // self.granularity

    @property
    def shared_width(self) -> int:
        """Total width of the shared experts (they are always active, so they merge into one MLP)."""
        return shared_experts_width(self)

    @property
    def couples_tokens(self) -> bool:
        return self.routing == "expert_choice"

    def capacity(self, num_tokens: int) -> int:
        """Expert choice: tokens taken by each expert."""
        c = math.ceil(self.capacity_factor * num_tokens * self.routed_top_k / self.num_routed_experts)
        return max(1, min(num_tokens, c))

    def _mean_routed_slots_per_token(self) -> float:
        if self.routing == "expert_choice":
            return self.routed_top_k * self.capacity_factor
        return float(self.routed_top_k)

    # -- accounting --------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense, *, num_experts: int = 8, top_k: int | None = None, active_share: float | None = None,
                   **options) -> "MoEConfig":
        """The LLaMA-MoE baseline of DSMoE: the same n contiguous blocks as experts and a
        softmax top-k router (``top_k``, or ``round(active_share · n)``). Weights are
        renormalised over the k kept experts and the routed output is scaled by n, so
        that with k = n and a uniform router the layer is the dense FFN again (and in
        general the output keeps the dense FFN's scale, as DSMoE's n/#active rescaling
        does). ``options``: other MoE fields."""
        if (top_k is None) == (active_share is None):
            raise ConfigError("top_k", "a moe conversion needs the experts per token (top_k) or the active share")
        if dense.intermediate_size % num_experts:
            raise ConfigError("num_experts", f"the dense width {dense.intermediate_size} is not divisible by {num_experts}")
        settings = dict(num_experts=num_experts, num_experts_per_tok=top_k or max(1, round(active_share * num_experts)),
                        expert_intermediate_size=dense.intermediate_size // num_experts, norm_topk_prob=True,
                        routed_scaling_factor=float(num_experts), norm_eps=dense.norm_eps)
        fields = {f.name for f in dataclasses.fields(cls)}
        settings.update({k: v for k, v in options.items() if k in fields})
        return cls(**settings)

    def weights_from_dense(self, dense_sd, *, generator=None):
        w_g, w_u, w_d = dense_swiglu_weights(dense_sd)
        F_width, D = w_g.shape
        n = self.num_routed_experts
        if self.granularity != 1 or self.num_shared_experts or n * self.routed_expert_width != F_width:
            raise ConfigError("ffn", "a split needs num_experts × expert_intermediate_size = the dense width, "
                                     "granularity 1 and no shared experts")
        b = F_width // n
        return {
            "norm.weight": dense_sd["norm.weight"],
            "router.weight": fresh_gate(n, D, w_g, generator),
            # (n, D, b) each: block i's columns
            "experts.w_gate_up": interleave_gate_up(w_g.view(n, b, D).transpose(1, 2),
                                                    w_u.view(n, b, D).transpose(1, 2)),
            "experts.w_down": w_d.t().reshape(n, b, D).contiguous(),  # rows of W_d (b, D) per block
        }

    def build(self, d_model: int, context: LayerContext | None = None) -> "MoEFFN":
        return MoEFFN(self, d_model)

    # -- Mixtral's sparse-MoE block is this layer with token choice, no shared expert ------
    hf_model_type: ClassVar[str] = "mixtral"
    hf_architecture: ClassVar[str] = "MixtralForCausalLM"
    hf_config_fields: ClassVar[frozenset[str]] = frozenset({"num_local_experts", "num_experts_per_tok",
                                                            "router_aux_loss_coef"})

    @classmethod
    def from_hf_config(cls, fields, norm_eps: float) -> "MoEConfig":
        return cls(num_experts=int(fields["num_local_experts"]), num_experts_per_tok=int(fields["num_experts_per_tok"]),
                   expert_intermediate_size=int(fields["intermediate_size"]),
                   norm_topk_prob=True,  # Mixtral renormalises its top-k weights
                   router_aux_loss_coef=float(fields.get("router_aux_loss_coef", 0.01)), router_z_loss_coef=0.0,
                   norm_eps=norm_eps)

    def hf_export_problem(self) -> str | None:
        if self.routing != "token_choice" or self.num_shared_experts or not self.norm_topk_prob \
                or self.routed_scaling_factor != 1.0 or self.disable_top1:
            return ("Mixtral has no shared experts, expert choice, unnormalised top-k weights, output scaling "
                    "or disabled top-1 expert")
        return None

    def hf_config(self) -> dict:
        return {"intermediate_size": self.routed_expert_width, "num_local_experts": self.num_routed_experts,
                "num_experts_per_tok": self.routed_top_k, "router_aux_loss_coef": self.router_aux_loss_coef,
                "router_jitter_noise": 0.0, "sliding_window": None}

    def weights_from_hf(self, hf_sd, prefix: str) -> dict[str, Tensor]:
        moe_prefix = prefix + ("mlp." if prefix + "mlp.gate.weight" in hf_sd else "block_sparse_moe.")
        return {"norm.weight": hf_sd[prefix + "post_attention_layernorm.weight"],
                **mixtral_experts_from_hf(hf_sd, moe_prefix, self.num_experts)}

    def weights_to_hf(self, sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """Mixtral's Hub layout, ``block_sparse_moe.experts.{j}.w1/w2/w3`` (transformers 4
        and 5 both read it)."""
        hf = {prefix + "post_attention_layernorm.weight": sd["norm.weight"],
              prefix + "block_sparse_moe.gate.weight": sd["router.weight"]}
        w_gate, w_up = split_gate_up(sd["experts.w_gate_up"])
        for j in range(w_gate.shape[0]):  # (E, D, F) / (E, F, D) → nn.Linear (out, in)
            expert = f"{prefix}block_sparse_moe.experts.{j}."
            hf[expert + "w1.weight"] = w_gate[j].t().contiguous()
            hf[expert + "w3.weight"] = w_up[j].t().contiguous()
            hf[expert + "w2.weight"] = sd["experts.w_down"][j].t()
        return hf

    def num_params(self, d_model: int) -> int:
        router = d_model * self.num_routed_experts
        experts = self.num_routed_experts * swiglu_params(d_model, self.routed_expert_width)
        return d_model + router + experts + swiglu_params(d_model, self.shared_width) + self._mix_gate_params(d_model)

    def _mix_gate_params(self, d_model: int) -> int:
        return 2 * d_model + 2 if self.shared_mix == "gate" else 0  # W_c (D×2) and b_c

    def num_active_params(self, d_model: int) -> float:
        mix_bias = 2 if self.shared_mix == "gate" else 0
        return d_model + self._active_matmul_params(d_model) + mix_bias

    def flops_per_token(self, d_model: int) -> float:
        return 2 * self._active_matmul_params(d_model)

    def _active_matmul_params(self, d_model: int) -> float:
        router = d_model * self.num_routed_experts
        routed = self._mean_routed_slots_per_token() * swiglu_params(d_model, self.routed_expert_width)
        mix_gate = 2 * d_model if self.shared_mix == "gate" else 0
        return router + routed + swiglu_params(d_model, self.shared_width) + mix_gate


class MoEFFN(FFN):
    def __init__(self, config: MoEConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model, config.norm_eps)
        self.router = nn.Linear(d_model, config.num_routed_experts, bias=False)
        self.experts = SwiGLUExperts(config.num_routed_experts, d_model, config.routed_expert_width,
                                     impl=config.experts_impl)
        self.shared = SwiGLU(d_model, config.shared_width) if config.shared_width > 0 else None
        self.shared_gate = nn.Linear(d_model, 2, bias=True) if config.shared_mix == "gate" else None

    def supported_interventions(self) -> tuple[str, ...]:
        cfg = self.config
        can_skip = cfg.routing == "expert_choice" or cfg.routed_top_k < cfg.num_routed_experts
        return ("disable_top1",) if can_skip else ()

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        cfg = self.config
        skip_top1 = cfg.disable_top1 or self.intervening("disable_top1")
        B, T, D = h_BTD.shape
        u_ND = self.norm(h_BTD).reshape(B * T, D)
        logits_NE, mix_logits_N2 = self._router_logits(u_ND)
        probs_NE = routing.router_probs(logits_NE)

        aux: dict[str, Tensor] = {}
        if cfg.routing == "token_choice":
            weights_NK, idx_NK = routing.topk_routing(
                probs_NE, cfg.routed_top_k, renormalize=cfg.norm_topk_prob, skip_top1=skip_top1
            )
            y_ND = dispatch_token_choice(self.experts, u_ND, weights_NK, idx_NK, stats)
            if cfg.router_aux_loss_coef > 0:
                aux["load_balancing"] = cfg.router_aux_loss_coef * routing.load_balancing_loss(
                    probs_NE=probs_NE, idx_NK=idx_NK
                )
            dropped = None
            routed_idx = idx_NK
        else:
            weights_EC, idx_EC = routing.expert_choice_routing(
                probs_NE, cfg.capacity(B * T), skip_top1=skip_top1
            )
            y_ND = dispatch_expert_choice(self.experts, u_ND, weights_EC, idx_EC, stats)
            routed_idx = torch.arange(cfg.num_routed_experts, device=u_ND.device).repeat_interleave(idx_EC.shape[1])
            dropped = None
            if stats is not None:  # tokens that no expert took
                chosen = torch.zeros(B * T, device=u_ND.device).index_fill_(0, idx_EC.reshape(-1), 1.0)
                dropped = (B * T - chosen.sum()).double()
        if stats is not None:
            stats.add(Routing.of(probs_NE, routed_idx, dropped))
        if cfg.router_z_loss_coef > 0:
            aux["router_z"] = cfg.router_z_loss_coef * routing.router_z_loss(logits_NE=logits_NE)
        if cfg.routed_scaling_factor != 1.0:
            y_ND = y_ND * cfg.routed_scaling_factor
        if mix_logits_N2 is not None:
            mix_N2 = torch.softmax(mix_logits_N2, dim=-1).to(y_ND.dtype)
            y_ND = mix_N2[:, :1] * y_ND + mix_N2[:, 1:] * self.shared(u_ND, stats)
        elif self.shared is not None:
            y_ND = y_ND + self.shared(u_ND, stats)

        return FFNOutput(update=y_ND.reshape(B, T, D), aux_losses=aux)

    def _router_logits(self, u_ND: Tensor) -> tuple[Tensor, Tensor | None]:
        """Router logits ``u W_r`` (N, E) in float32 and, with a gated shared expert, the
        mixing gate's ``u W_c + b_c`` (N, 2): one float32 product of E + 2 columns (the
        normed input read once, one input gradient instead of two; measured faster,
        benchmarks/NOTES.md), the router's columns with a zero bias."""
        if self.shared_gate is None:
            return float32_linear(u_ND, self.router.weight), None
        E = self.router.out_features
        weight = torch.cat([self.router.weight, self.shared_gate.weight])
        bias = torch.cat([self.shared_gate.bias.new_zeros(E), self.shared_gate.bias])
        logits_N = float32_linear(u_ND, weight, bias)
        return logits_N[:, :E], logits_N[:, E:]

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)
            nn.init.zeros_(self.shared_gate.bias)


def mixtral_experts_from_hf(hf_sd, prefix: str, num_experts: int) -> dict[str, Tensor]:
    """Router and expert weights of one Mixtral sparse-MoE block (``prefix`` ends with
    ``.``), as ``MoEFFN`` keys ``router.weight`` and ``experts.w_{gate_up,down}``; both the
    4.x layout (``experts.{j}.w1/w2/w3``) and the fused 5.x one (``experts.gate_up_proj``)."""
    out = {"router.weight": hf_sd[prefix + "gate.weight"]}
    if prefix + "experts.gate_up_proj" in hf_sd:  # transformers >= 5: fused (E, 2F, D) and (E, D, F)
        gate_up_EFD = hf_sd[prefix + "experts.gate_up_proj"]
        F_width = gate_up_EFD.shape[1] // 2
        out["experts.w_gate_up"] = interleave_gate_up(gate_up_EFD[:, :F_width, :].transpose(1, 2),
                                                      gate_up_EFD[:, F_width:, :].transpose(1, 2))
        out["experts.w_down"] = hf_sd[prefix + "experts.down_proj"].transpose(1, 2)
    else:  # transformers 4.x: w1 = gate, w3 = up, w2 = down, as nn.Linear (out, in)
        e = range(num_experts)
        gate, up = ([hf_sd[f"{prefix}experts.{j}.{w}.weight"].t() for j in e] for w in ("w1", "w3"))
        out["experts.w_gate_up"] = interleave_gate_up(torch.stack(gate), torch.stack(up))
        out["experts.w_down"] = torch.stack([hf_sd[f"{prefix}experts.{j}.w2.weight"].t() for j in e])
    return {k: v.contiguous() for k, v in out.items()}
