"""Deliberately naive float64 references, written independently of finemoe's layers.

They loop over tokens and experts in Python and read weights from a plain dict, so a
bug in finemoe's vectorised dispatch, sorting or routing cannot hide in them.
"""

from __future__ import annotations

import math

import torch


def rmsnorm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def silu(x):
    return x / (1 + torch.exp(-x))


def swiglu(x, w_gate_DF, w_up_DF, w_down_FD):
    """One token (D,) or a batch (..., D); weights as (D, F), (D, F), (F, D)."""
    return (silu(x @ w_gate_DF) * (x @ w_up_DF)) @ w_down_FD


def softmax(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def dense_ffn(h, p, eps):
    """p: 'norm.weight', 'mlp.{gate,up,down}_proj.weight' (nn.Linear layout)."""
    u = rmsnorm(h, p["norm.weight"], eps)
    return swiglu(u, p["mlp.gate_proj.weight"].T, p["mlp.up_proj.weight"].T, p["mlp.down_proj.weight"].T)


def moe_ffn(h, p, cfg):
    """Token-choice or expert-choice MoE, one token (or one expert) at a time.

    Returns (update, load_balancing_loss, z_loss), losses without coefficients.
    """
    B, T, D = h.shape
    u = rmsnorm(h, p["norm.weight"], cfg.norm_eps).reshape(B * T, D)
    N, E = u.shape[0], cfg.num_routed_experts
    k = cfg.routed_top_k
    out = [torch.zeros(D, dtype=h.dtype) for _ in range(N)]

    def expert(e, x):
        return swiglu(x, p["experts.w_gate"][e], p["experts.w_up"][e], p["experts.w_down"][e])

    logits = [u[n] @ p["router.weight"].T for n in range(N)]
    probs = [softmax(logits[n]) for n in range(N)]
    slots_per_expert = [0] * E

    if cfg.routing == "token_choice":
        for n in range(N):
            order = sorted(range(E), key=lambda e: -float(probs[n][e].detach()))
            chosen = order[1 : k + 1] if cfg.disable_top1 else order[:k]
            weights = [probs[n][e] for e in chosen]
            if cfg.norm_topk_prob:
                total = sum(weights)
                weights = [w / total for w in weights]
            for e, g in zip(chosen, weights):
                out[n] = out[n] + g * expert(e, u[n])
                slots_per_expert[e] += 1
    else:
        capacity = max(1, min(N, math.ceil(cfg.capacity_factor * N * k / E)))
        for e in range(E):
            candidates = [n for n in range(N) if not (cfg.disable_top1 and int(torch.argmax(probs[n])) == e)]
            candidates.sort(key=lambda n: -float(probs[n][e].detach()))
            for n in candidates[:capacity]:
                out[n] = out[n] + probs[n][e] * expert(e, u[n])

    out = [o * cfg.routed_scaling_factor for o in out]
    if cfg.shared_width > 0:
        for n in range(N):
            shared = swiglu(u[n], p["shared.gate_proj.weight"].T, p["shared.up_proj.weight"].T, p["shared.down_proj.weight"].T)
            if cfg.shared_mix == "gate":
                c = softmax(u[n] @ p["shared_gate.weight"].T + p["shared_gate.bias"])
                out[n] = c[0] * out[n] + c[1] * shared
            else:
                out[n] = out[n] + shared

    f = [c / (N * k) for c in slots_per_expert]
    mean_P = [sum(probs[n][e] for n in range(N)) / N for e in range(E)]
    lb = E * sum(f[e] * mean_P[e] for e in range(E))
    z = sum(torch.logsumexp(logits[n], 0) ** 2 for n in range(N)) / N
    return torch.stack(out).reshape(B, T, D), lb, z
