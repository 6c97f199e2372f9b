"""Speed of one FFN layer of every kind, side by side with finemoe's dense FFN of equal
active FLOPs, in one process (so the ratios hold whatever the machine).

For each size (d = 1024 with 16,384 tokens, and d = 512 with 4,096 tokens), every layer
has the active FLOPs of a dense SwiGLU of width 4·d. Forward + backward under bf16
autocast (float32 on the CPU), a random cotangent, CUDA events, median of the repeats
after warm-up. The ratio is speed per active FLOP against the dense FFN, timed again
just before and just after each layer (so both medians come from the same seconds of
the run): ``(dense ms / layer ms) · (layer FLOPs / dense FLOPs)``. Also measured: DSMoE
inference (forward, eval, sparse path; the share of active blocks is reported) against
the dense forward, for a prefill batch and for decoding one token, and two eager
anchors written the way people write MoE layers: a Hugging Face Mixtral-style loop over
experts, and a plain ``torch._grouped_mm`` dispatch.

    python benchmarks/layer_benchmark.py --out results/layer_speed_h100
    python benchmarks/layer_benchmark.py --device cpu --quick      # a smoke run

Writes ``OUT.json`` (one row per layer: name, ms, ratio_vs_dense, ...) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finemoe.config import from_dict  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402
from finemoe.environment import git_commit  # noqa: E402
from finemoe.kernels.quack_experts import quack_installed  # noqa: E402


def layer_configs(d: int) -> dict[str, dict]:
    """Every layer at the active FLOPs of a dense SwiGLU of width F = 4·d."""
    F_ = 4 * d
    configs = {
        "dense": {"kind": "dense", "intermediate_size": F_},
        "moe E=8 k=2": {"kind": "moe", "num_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_size": F_ // 2},
        "moe E=64 k=8 (fine-grained)": {"kind": "moe", "num_experts": 64, "num_experts_per_tok": 8,
                                        "expert_intermediate_size": F_ // 8},
        "moe SMoE-Share (E=8 k=2 F/4 + shared)": {"kind": "moe", "num_experts": 8, "num_experts_per_tok": 2,
                                                  "expert_intermediate_size": F_ // 4, "num_shared_experts": 1,
                                                  "shared_expert_intermediate_size": F_ // 2, "shared_mix": "gate"},
        "cartesian (8 sub-experts, k=2, + shared)": {"kind": "cartesian", "num_experts": 8, "num_experts_per_tok": 2,
                                                     "expert_intermediate_size": F_ // 8,
                                                     "shared_expert_intermediate_size": F_ // 4},
        "finedeep 2x4": {"kind": "finedeep", "num_sublayers": 2, "experts_per_sublayer": 4,
                         "expert_intermediate_size": F_ // 8},
        "finedeep 4x4": {"kind": "finedeep", "num_sublayers": 4, "experts_per_sublayer": 4,
                         "expert_intermediate_size": F_ // 16},
        "finedeep 2x4 (PyTorch gate)": {"kind": "finedeep", "num_sublayers": 2, "experts_per_sublayer": 4,
                                        "expert_intermediate_size": F_ // 8, "gate_kernel": False},
        "finedeep 4x4 (PyTorch gate)": {"kind": "finedeep", "num_sublayers": 4, "experts_per_sublayer": 4,
                                        "expert_intermediate_size": F_ // 16, "gate_kernel": False},
        "dsmoe n=8 (training path)": {"kind": "dsmoe", "intermediate_size": F_, "num_experts": 8},
    }
    if quack_installed():  # the opt-in QuACK path beside the default one (finemoe.kernels.quack_experts)
        configs = {name: spec for base, base_spec in configs.items()
                   for name, spec in [(base, base_spec)] + ([(f"{base} [experts_impl=quack]",
                                                              base_spec | {"experts_impl": "quack"})]
                                                            if base in TOKEN_CHOICE else [])}
    return configs


TOKEN_CHOICE = ("moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
                "cartesian (8 sub-experts, k=2, + shared)")


EAGER_REFERENCE = ("moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "cartesian (8 sub-experts, k=2, + shared)")


# -- the two anchors: MoE layers as commonly written ----------------------------------------------------------


class MixtralStyleLoop(torch.nn.Module):
    """Hugging Face Mixtral's sparse-MoE block as written in transformers 4.x: a loop over
    experts, ``torch.where`` on the one-hot mask, ``index_add_``."""

    def __init__(self, d: int, num_experts: int, k: int, width: int):
        super().__init__()
        self.k = k
        self.norm = torch.nn.RMSNorm(d)
        self.gate = torch.nn.Linear(d, num_experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, width, d) * 0.02)
        self.w3 = torch.nn.Parameter(torch.randn(num_experts, width, d) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, d, width) * 0.02)

    def forward(self, h):
        B, T, D = h.shape
        x = self.norm(h).reshape(-1, D)
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, self.w1.shape[0]).permute(2, 1, 0)
        for e in range(self.w1.shape[0]):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            xe = x[token]
            ye = (F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())) @ self.w2[e].t()
            out.index_add_(0, token, (ye * weights[token, slot, None]).to(out.dtype))
        return out.reshape(B, T, D)


class PlainGroupedMM(MixtralStyleLoop):
    """A plain 10-line ``torch._grouped_mm`` dispatch: argsort, gather, three grouped
    GEMMs, weighted ``index_add_``."""

    def forward(self, h):
        B, T, D = h.shape
        x = self.norm(h).reshape(-1, D)
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        order = chosen.reshape(-1).argsort()
        token = order // self.k
        offs = torch.cumsum(torch.bincount(chosen.reshape(-1), minlength=self.w1.shape[0]), 0).to(torch.int32)
        xs = x[token].to(torch.bfloat16)
        w1, w3, w2 = (w.to(torch.bfloat16).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
        hidden = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
        ys = torch._grouped_mm(hidden, w2, offs=offs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype)).reshape(B, T, D)


class PaperPEERPort(torch.nn.Module):
    """PEER written as the paper's pseudo-code: einsum scores against the two sub-key
    tables, three top-k, ``nn.Embedding`` gathers of the retrieved rows, einsum products
    (the eager port of issue 12's table)."""

    def __init__(self, d: int, num_experts: int, heads: int, k: int, key_dim: int):
        super().__init__()
        self.heads, self.k, self.key_dim, self.sub = heads, k, key_dim, int(num_experts ** 0.5)
        self.norm = torch.nn.RMSNorm(d)
        self.query = torch.nn.Linear(d, heads * key_dim)
        self.bn = torch.nn.BatchNorm1d(heads * key_dim)
        self.sub_keys = torch.nn.Parameter(torch.randn(2, self.sub, key_dim // 2) * (key_dim // 2) ** -0.5)
        self.down = torch.nn.Embedding(num_experts, d)
        self.up = torch.nn.Embedding(num_experts, d)

    def forward(self, h):
        B, T, D = h.shape
        x = self.norm(h).reshape(-1, D)
        q = self.bn(self.query(x)).view(x.shape[0], self.heads, 2, self.key_dim // 2)
        s1, i1 = torch.einsum("nhq,sq->nhs", q[:, :, 0], self.sub_keys[0]).topk(self.k, dim=-1)
        s2, i2 = torch.einsum("nhq,sq->nhs", q[:, :, 1], self.sub_keys[1]).topk(self.k, dim=-1)
        candidates = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
        scores, pos = candidates.topk(self.k, dim=-1)
        idx = i1.gather(-1, pos // self.k) * self.sub + i2.gather(-1, pos % self.k)
        hidden = F.gelu(torch.einsum("nd,nhkd->nhk", x, self.down(idx))) * scores.softmax(-1)
        return torch.einsum("nhk,nhkd->nd", hidden, self.up(idx)).reshape(B, T, D)


def product_key_configs(d: int) -> dict[str, dict]:
    """PEER and PKM at issue 12's size: 1024² experts, 8 heads, key width 256."""
    peer = {"kind": "peer", "num_experts": 1024**2, "num_heads": 8, "top_k": 16, "key_dim": 256}
    pkm = peer | {"kind": "pkm", "top_k": 32}
    eager, fused = {"retrieval_impl": "eager", "experts_impl": "eager"}, {"retrieval_impl": "triton", "experts_impl": "triton"}
    return {"peer N=1024² h=8 k=16 [eager]": peer | eager, "peer N=1024² h=8 k=16 [triton]": peer | fused,
            "pkm N=1024² h=8 k=32 [eager]": pkm | eager, "pkm N=1024² h=8 k=32 [triton]": pkm | fused}


# -- timing --------------------------------------------------------------------------------------------------


def _timer(device: str):
    if device == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def _peak_gib(fn, device: str) -> float:
    """Peak memory of one call of ``fn`` beyond what was held before it (GiB; NaN on the CPU)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def time_ms(fn, device: str, warmup: int, repeats: int) -> tuple[float, list[float], float]:
    """Median and all times (ms) of ``fn``, and its peak memory beyond what was held before (GiB)."""
    timer = _timer(device)
    for _ in range(warmup):
        fn()
    peak = _peak_gib(fn, device)
    times = [timer(fn) for _ in range(repeats)]
    return statistics.median(times), times, peak


def time_bracketed(fn, baseline, device: str, warmup: int, repeats: int
                   ) -> tuple[float, list[float], float, list[float]]:
    """``fn`` timed between two timings of ``baseline`` (the dense FFN's step), each
    after its own warm-up: ``fn``'s median, all its times, its peak memory (one call
    alone) and the baseline's times from both brackets.

    Between runs of one table the dense FFN's CUDA graph took 2.53–2.84 ms while the
    routed layers took the same, so a ratio is taken against the baseline as measured
    just before and after the layer, not once at the start of the run. (Strict
    alternation, one baseline call per layer call, was tried: the baseline then runs in
    its partner's wake, e.g. the eager dense step took 2.5 ms alone and 3.6–3.9 ms
    between calls of a slow eager layer.)"""
    before = time_ms(baseline, device, warmup, repeats)[1]
    ms, times, peak = time_ms(fn, device, warmup, repeats)
    after = time_ms(baseline, device, warmup, repeats)[1]
    return ms, times, peak, before + after


def median_ms(fn, warmup: int = 3, repeats: int = 10, device: str = "cuda") -> float:
    """The median time (ms) of ``fn`` (``time_ms`` without the spread and the memory)."""
    return time_ms(fn, device, warmup, repeats)[0]


def compiled(layer, cuda_graphs: bool = False):
    """``torch.compile(layer)``; with ``cuda_graphs``, ``mode="reduce-overhead"``.

    Every layer of one design runs the same ``forward`` code object, and each variant
    (expert count, implementation, compile mode) is one more compiled entry for it: past
    Dynamo's recompile limit (8) the later rows ran eagerly, unnoticed (moe E = 64 and
    SMoE-Share as CUDA graphs took 5.2 and 7.4 ms once the QuACK rows came first, 4.3 and
    3.5 with the limit raised; on the CPU the ninth variant logs "hit config.recompile_limit
    (8)": benchmarks/NOTES.md). The limit is raised so each row is compiled."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(layer, mode="reduce-overhead") if cuda_graphs else torch.compile(layer)


def bare_matmuls(d: int, F_: int, tokens: int, device: str, compile: bool = False, cuda_graphs: bool = False):
    """Forward + backward of the dense FFN's three products and nothing else: ``x W_g``,
    ``x W_u``, ``h W_d`` in bf16 (bf16 weights: no casts, no norm, no activation), nine
    GEMMs with their gradients."""
    g = torch.Generator(device=device).manual_seed(0)
    new = lambda *shape: (torch.randn(*shape, device=device, generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()  # noqa: E731
    x, h, w_g, w_u, w_d = new(tokens, d), new(tokens, F_), new(d, F_), new(d, F_), new(F_, d)
    dy_F, dy_D = new(tokens, F_).detach(), new(tokens, d).detach()

    def products(x, h, w_g, w_u, w_d):
        return x @ w_g, x @ w_u, h @ w_d

    run = compiled(products, cuda_graphs) if compile else products

    def step():
        a, b, c = run(x, h, w_g, w_u, w_d)
        torch.autograd.backward((a, b, c), (dy_F, dy_F, dy_D))
        for t in (x, h, w_g, w_u, w_d):
            t.grad = None
    return step


def fwd_bwd(layer, h, cotangent, autocast):
    def step():
        with autocast:
            out = layer(h)
        update = out.update if hasattr(out, "update") else out
        update.backward(cotangent.to(update.dtype))
        h.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def forward_only(layer, h, autocast):
    @torch.no_grad()
    def step():
        with autocast:
            layer(h)
    return step


def cuda_graph_forward(layer, h, autocast):
    """The inference forward captured once as a CUDA graph (possible where nothing
    synchronises with the host); each call replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), autocast:
        for _ in range(3):
            layer(h)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), autocast:
        layer(h)
    return graph.replay


# -- the run -----------------------------------------------------------------------------------------------------


def run_size(d: int, tokens: int, device: str, warmup: int, repeats: int, only: str | None,
             compile: bool = False, cuda_graphs: bool = False) -> list[dict]:
    """Every layer at this size; with ``compile``, each layer (the dense FFN too) under
    ``torch.compile`` and only the training rows; with ``cuda_graphs`` as well, compiled
    with ``mode="reduce-overhead"`` (the step replayed as CUDA graphs: no host launch cost,
    possible because every shape is static and nothing synchronises with the host)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    h = torch.randn(tokens // 512 if tokens >= 512 else 1, min(tokens, 512), d, device=device, requires_grad=True)
    cotangent = torch.randn(h.shape, device=device)
    configs = {name: from_dict(FFNConfig, dict(spec)) for name, spec in layer_configs(d).items()}
    dense_flops = configs["dense"].flops_per_token(d)
    rows: list[dict] = []
    baseline_rows: dict[int, dict] = {}

    def add(name, config_spec, flops, fn, *, against=None, kind="fwd+bwd", extra=None):
        """Time ``fn`` and add its row. ``against``: the baseline's step (the dense FFN of
        this mode, or the dense forward for the inference rows), timed just before and
        after ``fn`` for the ratio; ``None`` for a baseline's own row, whose time becomes
        the median over all its timings in the run (its first one alone, at the start
        of a run, took up to 1.3× the later ones as CUDA graphs)."""
        if only and not name.startswith("dense") and not any(part in name for part in only.split(",")):
            return
        if compile:
            name = f"{name} [compiled{', CUDA graphs' if cuda_graphs else ''}]"
        if against is None:
            ms, times, peak = time_ms(fn, device, warmup, repeats)
            ref_ms = ms
        else:
            ms, times, peak, brackets = time_bracketed(fn, against, device, warmup, repeats)
            ref_ms = statistics.median(brackets)
            baseline_row = baseline_rows[id(against)]  # its time: the median over all its timings
            baseline_row["ms_all"] += brackets
            before, baseline_row["ms"] = baseline_row["ms"], statistics.median(baseline_row["ms_all"])
            baseline_row["baseline_ms"] = baseline_row["ms"]
            baseline_row["tflops"] *= before / baseline_row["ms"]
        if cuda_graphs:  # the graphs' memory pool is allocated in warm-up, before the peak is reset
            peak = float("nan")
        row = {"name": name, "d_model": d, "tokens": tokens, "pass": kind, "ms": ms, "ms_all": times,
               "baseline_ms": ref_ms, "ratio_vs_dense": (ref_ms / ms) * (flops / dense_flops),
               "active_flops_per_token": flops, "tflops": (3 if kind == "fwd+bwd" else 1) * flops * tokens / ms / 1e9,
               "peak_gib": peak, "config": config_spec} | (extra or {})
        rows.append(row)
        if against is None:
            baseline_rows[id(fn)] = row
        print(f"  {name:48s} {kind:8s} {ms:8.3f} ms  (dense {ref_ms:.3f})  ratio {row['ratio_vs_dense']:.3f}  "
              f"{row['tflops']:6.1f} TFLOP/s  peak {peak:.2f} GiB", flush=True)

    dense_step = None
    for name, cfg in configs.items():
        torch.manual_seed(0)
        layer = cfg.build(d).to(device).train()
        spec = layer_configs(d)[name]
        step = fwd_bwd(compiled(layer, cuda_graphs) if compile else layer, h, cotangent, autocast)
        add(name, spec, cfg.flops_per_token(d), step, against=dense_step)
        if name == "dense":
            dense_step = step
        if name in EAGER_REFERENCE and not compile:
            eager_cfg = cfg.replace(experts_impl="eager")
            layer = eager_cfg.build(d).to(device).train()
            add(f"{name} [experts_impl=eager]", spec | {"experts_impl": "eager"}, cfg.flops_per_token(d),
                fwd_bwd(layer, h, cotangent, autocast), against=dense_step)
        del layer
    if device == "cuda":  # the ceiling of the dense FFN: its three matrix products alone (issue 15)
        add("anchor: dense FFN's three bare matrix products", {"kind": "bare GEMMs", "F": 4 * d}, dense_flops,
            bare_matmuls(d, 4 * d, tokens, device, compile, cuda_graphs), against=dense_step)
    if compile:
        return rows

    for label, (E, k, width) in {"moe E=8 k=2": (8, 2, 2 * d), "moe E=64 k=8": (64, 8, d // 2)}.items():
        flops = configs["moe E=8 k=2" if E == 8 else "moe E=64 k=8 (fine-grained)"].flops_per_token(d)
        torch.manual_seed(0)
        add(f"anchor: Mixtral-style loop, {label}", {"E": E, "k": k, "width": width}, flops,
            fwd_bwd(MixtralStyleLoop(d, E, k, width).to(device), h, cotangent, autocast), against=dense_step)
        if device == "cuda":
            add(f"anchor: plain grouped_mm dispatch, {label}", {"E": E, "k": k, "width": width}, flops,
                fwd_bwd(PlainGroupedMM(d, E, k, width).to(device), h, cotangent, autocast), against=dense_step)

    if d == 1024 and device == "cuda":  # PEER and PKM at issue 12's size (tables of 4 GiB each)
        for name, spec in product_key_configs(d).items():
            cfg = from_dict(FFNConfig, dict(spec))
            torch.manual_seed(0)
            layer = cfg.build(d).to(device).train()
            add(name, spec, cfg.flops_per_token(d), fwd_bwd(layer, h, cotangent, autocast), against=dense_step)
            del layer
        port_cfg = from_dict(FFNConfig, dict(product_key_configs(d)["peer N=1024² h=8 k=16 [eager]"]))
        add("anchor: peer as the paper's pseudo-code", {"kind": "peer port"}, port_cfg.flops_per_token(d),
            fwd_bwd(PaperPEERPort(d, 1024**2, 8, 16, 256).to(device), h, cotangent, autocast), against=dense_step)

    # DSMoE inference: the sparse path against the dense forward, prefill and decode
    dense = configs["dense"].build(d).to(device).eval()
    dsmoe_cfg = configs["dsmoe n=8 (training path)"]
    torch.manual_seed(0)
    dsmoe = dsmoe_cfg.build(d).to(device).eval()
    with torch.no_grad(), autocast:
        u = dsmoe.norm(h).reshape(-1, d)
        share = float(dsmoe.gates(u)[2].float().mean())
    dsmoe_reference = dsmoe_cfg.replace(experts_impl="eager").build(d).to(device).eval()
    dsmoe_reference.load_state_dict(dsmoe.state_dict())
    dsmoe_spec = layer_configs(d)["dsmoe n=8 (training path)"] | {"active_share": share}
    for label, x in (("prefill", h.detach()), ("decode, batch 1", h.detach()[:1, :1])):
        n = x.shape[0] * x.shape[1]
        dense_fwd = forward_only(dense, x, autocast)
        add(f"dense forward ({label})", layer_configs(d)["dense"], dense_flops, dense_fwd, kind="fwd",
            extra={"tokens": n})
        add(f"dsmoe sparse inference ({label})", dsmoe_spec, dense_flops, forward_only(dsmoe, x, autocast),
            against=dense_fwd, kind="fwd", extra={"tokens": n, "active_share": share})
        if label == "prefill":
            add(f"dsmoe sparse inference ({label}) [experts_impl=eager: exact sizes, one host sync]",
                dsmoe_spec | {"experts_impl": "eager"}, dense_flops, forward_only(dsmoe_reference, x, autocast),
                against=dense_fwd, kind="fwd", extra={"tokens": n, "active_share": share})
        if device == "cuda":  # without the host's launch cost: each forward replayed as one CUDA graph
            dense_graph = cuda_graph_forward(dense, x, autocast)
            add(f"dense forward ({label}) [CUDA graph]", layer_configs(d)["dense"], dense_flops, dense_graph,
                kind="fwd", extra={"tokens": n})
            add(f"dsmoe sparse inference ({label}) [CUDA graph]", dsmoe_spec, dense_flops,
                cuda_graph_forward(dsmoe, x, autocast), against=dense_graph, kind="fwd",
                extra={"tokens": n, "active_share": share})
    return rows


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def markdown(result: dict) -> str:
    lines = [
        f"# One FFN layer of every kind against the dense FFN, {result['hardware']}",
        "",
        f"Commit `{result['commit']}`; command `{result['command']}`.",
        "Forward + backward under bf16 autocast (forward only where marked), median of "
        f"{result['repeats']} after {result['warmup']} warm-up runs; ratio = speed per active FLOP against finemoe's "
        "dense FFN, timed just before and after each layer in the same process (the DSMoE inference rows against the "
        "dense forward of the same batch); \"dense ms\" is the baseline's median over those two timings.",
        "",
    ]
    for (d, tokens) in result["sizes"]:
        rows = [r for r in result["rows"] if r["d_model"] == d and r["tokens"] in (tokens, 1)]
        if not rows:
            continue
        lines += [f"## d = {d}, {tokens:,} tokens (dense F = {4 * d})", "",
                  "| layer | pass | ms | dense ms | ratio vs dense | TFLOP/s | peak GiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            share = f" ({r['active_share']:.0%} of blocks on)" if "active_share" in r else ""
            lines.append(f"| {r['name']}{share} | {r['pass']} | {r['ms']:.3f} | {r['baseline_ms']:.3f} | "
                         f"{r['ratio_vs_dense']:.3f} | "
                         f"{r['tflops']:.1f} | {r['peak_gib']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", default=None, help="Only layers whose name contains one of these comma-separated parts (and dense).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, few repeats: a smoke run.")
    parser.add_argument("--compile", action="store_true",
                        help="Also every layer under torch.compile, at the first size (training rows).")
    parser.add_argument("--compile-only", action="store_true", help="Only the compiled rows (fits a shorter command).")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="The compiled rows with mode='reduce-overhead' (CUDA graphs) as well.")
    parser.add_argument("--out", default=None, help="Path stem for .json and .md results.")
    args = parser.parse_args()

    sizes = [(64, 256)] if args.quick else [(1024, 16384), (512, 4096)]
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    rows = []
    for d, tokens in [] if args.compile_only or args.cuda_graphs else sizes:
        print(f"d = {d}, {tokens} tokens", flush=True)
        rows += run_size(d, tokens, args.device, warmup, repeats, args.only)
    if args.compile or args.compile_only:
        d, tokens = sizes[0]
        print(f"d = {d}, {tokens} tokens, compiled", flush=True)
        rows += run_size(d, tokens, args.device, warmup, repeats, args.only, compile=True)
    if args.cuda_graphs:
        d, tokens = sizes[0]
        print(f"d = {d}, {tokens} tokens, compiled, CUDA graphs", flush=True)
        rows += run_size(d, tokens, args.device, warmup, repeats, args.only, compile=True, cuda_graphs=True)
    result = {"hardware": hardware(args.device), "commit": git_commit(), "command": " ".join(["python"] + sys.argv),
              "sizes": sizes, "warmup": warmup, "repeats": repeats, "rows": rows}
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
