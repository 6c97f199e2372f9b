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


def routed_expert(p, e, x):
    """Expert e of a bank stored as ``experts.w_gate_up`` (E, D, 2F), the gate's column j at
    2j and the up projection's at 2j + 1, and ``experts.w_down`` (E, F, D)."""
    gate_up = p["experts.w_gate_up"][e]
    return swiglu(x, gate_up[:, 0::2], gate_up[:, 1::2], p["experts.w_down"][e])


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
        return routed_expert(p, e, x)

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


def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def finedeep_ffn(h, p, cfg):
    """M sub-layers of K experts, one token and one expert at a time (METHODS.md §1)."""
    B, T, D = h.shape
    M, K, f = cfg.num_sublayers, cfg.experts_per_sublayer, cfg.expert_intermediate_size
    state = [h.reshape(B * T, D)[n] for n in range(B * T)]
    start = list(state)
    for m in range(M):
        for n in range(len(state)):
            u = rmsnorm(state[n], p[f"norms.{m}.weight"], cfg.norm_eps)
            experts, scores = [], []
            for k in range(K):
                cols = slice(k * f, (k + 1) * f)
                e = swiglu(u, p["w_gate"][m][:, cols], p["w_up"][m][:, cols], p["w_down"][m][k])
                experts.append(e)
                source = e if cfg.router_input == "expert_output" else u
                scores.append(p["router"][m][k] @ source)
            scores = torch.stack(scores)
            if cfg.gate == "softmax":
                gates = softmax(scores)
            else:
                gates = sigmoid(scores)
                if cfg.normalize:
                    gates = gates / gates.sum()
            if cfg.gate_sum == "experts":
                gates = gates * K
            state[n] = state[n] + sum(g * e for g, e in zip(gates, experts))
    return (torch.stack(state) - torch.stack(start)).reshape(B, T, D), None


def dsmoe_ffn(h, p, cfg):
    """n blocks per token, gate by gate (METHODS.md §2); returns (update, Σ_i G(a_i) mean)."""
    B, T, D = h.shape
    n, b, tau = cfg.num_experts, cfg.block_width, cfg.threshold
    out, g_sums = [], []
    for x in h.reshape(B * T, D):
        u = rmsnorm(x, p["norm.weight"], cfg.norm_eps)
        terms, active, g_sum = [], 0, 0
        for i in range(n):
            cols = slice(i * b, (i + 1) * b)
            o = swiglu(u, p["mlp.gate_proj.weight"][cols].T, p["mlp.up_proj.weight"][cols].T,
                       p["mlp.down_proj.weight"][:, cols].T)
            a = sigmoid(u @ p["gate.weight"][i])
            on = bool(a > tau)
            G = a * on  # the hard gate as a function (its gradient is 1[a > τ])
            S = G.detach() + a - a.detach() if cfg.straight_through else G
            terms.append(o * S)
            active += on
            g_sum = g_sum + G
        y = sum(terms)
        if cfg.rescale:
            y = y * (n / active) if active else y * 0
        out.append(y)
        g_sums.append(g_sum)
    return torch.stack(out).reshape(B, T, D), sum(g_sums) / len(g_sums)


def _sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def cartesian_ffn(h, p, cfg):
    sub = cfg.sublayer
    a, lb_a, _ = moe_ffn(h, _sub(p, "sublayers.0."), sub)
    b, lb_b, _ = moe_ffn(h + a, _sub(p, "sublayers.1."), sub)
    return a + b, lb_a + lb_b


def _batchnorm_train(q, weight, bias, eps=1e-5):
    mean = q.mean(0)
    var = ((q - mean) ** 2).mean(0)
    return (q - mean) / torch.sqrt(var + eps) * weight + bias


def product_key_ffn(h, p, cfg, *, peer: bool):
    """Brute force over all N = S² full keys [c_a ; c'_b]: no product-key trick."""
    B, T, D = h.shape
    H, Kd, k, S = cfg.num_heads, cfg.key_dim, cfg.top_k, cfg.sub_keys
    u = rmsnorm(h.reshape(B * T, D), p["norm.weight"], cfg.norm_eps)
    q = u @ p["retrieval.query.weight"].T + p["retrieval.query.bias"]
    if cfg.query_batchnorm:
        q = _batchnorm_train(q, p["retrieval.query_norm.weight"], p["retrieval.query_norm.bias"])
    C1, C2 = p["retrieval.sub_keys"][0], p["retrieval.sub_keys"][1]
    full_keys = torch.stack([torch.cat([C1[a], C2[b]]) for a in range(S) for b in range(S)])  # (N, Kd)
    out = []
    for t in range(B * T):
        y = torch.zeros(D, dtype=h.dtype)
        for head in range(H):
            scores = full_keys @ q[t, head * Kd : (head + 1) * Kd]
            best = sorted(range(S * S), key=lambda i: -float(scores[i].detach()))[:k]
            s = torch.stack([scores[i] for i in best])
            gates = softmax(s) if cfg.gate == "softmax" else sigmoid(s)
            for g, i in zip(gates, best):
                if peer:
                    z = p["expert_in"][i] @ u[t]
                    act = gelu(z) if cfg.activation == "gelu" else torch.clamp(z, min=0)
                    y = y + g * act * p["expert_out"][i]
                else:
                    y = y + g * p["values"][i]
        out.append(y)
    return torch.stack(out).reshape(B, T, D), None


def hash_ffn(h, token_ids, p, cfg):
    """The Hash layer, one token at a time; the hash written out in plain integers."""
    B, T, D = h.shape
    u = rmsnorm(h, p["norm.weight"], cfg.norm_eps).reshape(B * T, D)
    out = []
    for n, token in enumerate(token_ids.reshape(-1).tolist()):
        mixed = (token * 2654435761 + cfg.hash_seed * 0x9E3779B9) % 2**32
        e = mixed * cfg.num_experts // 2**32
        y = routed_expert(p, e, u[n])
        if cfg.shared_width:
            y = y + swiglu(u[n], p["shared.gate_proj.weight"].T, p["shared.up_proj.weight"].T,
                           p["shared.down_proj.weight"].T)
        out.append(y)
    return (torch.stack(out).reshape(B, T, D),)


def topp_ffn(h, p, cfg):
    """Top-p routing, one token at a time: experts in order of probability while the
    mass taken so far is below p (capped). Returns (update, load balancing, dynamic)."""
    B, T, D = h.shape
    u = rmsnorm(h, p["norm.weight"], cfg.norm_eps).reshape(B * T, D)
    N, E = u.shape[0], cfg.num_experts
    out, all_probs, kept_counts = [], [], [0.0] * E
    for n in range(N):
        probs = softmax(u[n] @ p["router.weight"].T)
        all_probs.append(probs)
        chosen, mass = [], 0.0
        for e in sorted(range(E), key=lambda e: -float(probs[e].detach()))[: cfg.max_experts_per_tok]:
            if mass >= cfg.threshold:
                break
            chosen.append(e)
            mass += float(probs[e].detach())
        weights = [probs[e] for e in chosen]
        if cfg.renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        y = sum(w * routed_expert(p, e, u[n])
                for w, e in zip(weights, chosen))
        if cfg.shared_width:
            y = y + swiglu(u[n], p["shared.gate_proj.weight"].T, p["shared.up_proj.weight"].T,
                           p["shared.down_proj.weight"].T)
        out.append(y)
        for e in chosen:
            kept_counts[e] += 1
    probs = torch.stack(all_probs)
    f = torch.tensor(kept_counts, dtype=h.dtype) / sum(kept_counts)
    load_balancing = E * (f * probs.mean(0)).sum()
    dynamic = -(probs * torch.log(probs)).sum(-1).mean()
    return torch.stack(out).reshape(B, T, D), load_balancing, dynamic
