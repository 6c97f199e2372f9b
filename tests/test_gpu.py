"""CUDA checks: every kind runs forward and backward on the GPU under bf16 autocast and
agrees with its float32 CPU result. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.test_training import SMALL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _assert_same_results(got, expected, tol: float = 1e-4) -> None:
    """``(output, input gradient, {parameter: gradient})`` of two runs agree to ``tol``."""
    (out, gx, gp), (out_ref, gx_ref, gp_ref) = got, expected
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
    for name, grad in gp_ref.items():
        if grad is not None:
            torch.testing.assert_close(gp[name], grad, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_bf16_autocast_on_cuda_matches_float32_cpu(kind):
    torch.manual_seed(0)
    cpu_layer = SMALL[kind].build(48).eval()  # eval: BatchNorm uses fixed running stats on both sides
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    from finemoe.layers import CallContext

    h = torch.randn(4, 64, 48)
    ids = torch.randint(0, 1000, (4, 64))
    ref = cpu_layer(h, context=CallContext(token_ids=ids)).update
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_layer(h.cuda(), context=CallContext(token_ids=ids.cuda()))
    assert out.update.dtype in (torch.bfloat16, torch.float32)
    # Routing decisions may flip for near-ties under bf16, so compare in norm, loosely.
    assert _rel(out.update.cpu(), ref) < 5e-2, kind
    for loss in out.aux_losses.values():
        assert loss.dtype == torch.float32  # router math stays in float32

    gpu_layer.train()
    h_gpu = h.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_layer(h_gpu, context=CallContext(token_ids=ids.cuda()))
    (out.update.float().sum() + sum(out.aux_losses.values(), torch.zeros((), device="cuda"))).backward()
    assert torch.isfinite(h_gpu.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in gpu_layer.parameters() if p.grad is not None)


# -- fast paths on the GPU: bf16 against the float32 reference, outputs and gradients -------------------------------


def test_grouped_mm_bf16_on_cuda_matches_float32():
    """torch's grouped GEMM kernel on unaligned group sizes, empty groups included."""
    from finemoe.kernels import grouped_mm, native_grouped_mm_supported

    sizes = [37, 0, 300, 1, 0, 150, 89, 0]
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 256, device="cuda")
    w = torch.randn(len(sizes), 256, 128, device="cuda") / 16
    probe = torch.randn(sum(sizes), 128, device="cuda")
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    xb, wb = x.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    assert native_grouped_mm_supported(xb, wb)
    out = grouped_mm(xb, wb, offs)
    (out.float() * probe).sum().backward()
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = grouped_mm(xf, wf, offs)  # float32: the op's per-group loop
    (ref * probe).sum().backward()
    # bf16 operands: relative errors between 1e-3 and 1e-2 (METHOD.md)
    assert _rel(out, ref) < 1e-2 and _rel(xb.grad, xf.grad) < 1e-2 and _rel(wb.grad, wf.grad) < 1e-2
    empty = [e for e, s in enumerate(sizes) if s == 0]
    assert torch.count_nonzero(wb.grad[empty]) == 0


@pytest.mark.parametrize("kind", ["moe", "cartesian", "finedeep", "dsmoe"])
def test_fast_paths_bf16_match_the_float32_eager_reference(kind):
    """Each layer with its default (fast) path under bf16 autocast against the same layer
    in float32 with the eager experts loop: output and every gradient, relative error < 3e-2."""
    from finemoe.layers import CartesianConfig, DSMoEConfig, FinedeepConfig, MoEConfig

    configs = {
        "moe": MoEConfig(num_experts=8, num_experts_per_tok=2, expert_intermediate_size=256, num_shared_experts=1),
        "cartesian": CartesianConfig.with_sublayer(num_experts=8, num_experts_per_tok=2, expert_intermediate_size=128),
        "finedeep": FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=64),
        "dsmoe": DSMoEConfig(intermediate_size=512, num_experts=8),
    }
    torch.manual_seed(0)
    fast = configs[kind].build(256).cuda()
    reference = copy.deepcopy(fast)
    for module in reference.modules():
        if hasattr(module, "impl"):
            module.impl = "eager"
    h = torch.randn(4, 512, 256, device="cuda")
    probe = torch.randn(4, 512, 256, device="cuda")
    grads = []
    for layer, autocast in ((fast, True), (reference, False)):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        (out.update.float() * probe).sum().backward()
        grads.append((out.update.float(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = grads
    assert _rel(out_f, out_r) < 3e-2 and _rel(gx_f, gx_r) < 3e-2
    for name, grad in gp_r.items():
        # matrices; a vector's gradient (a bias, a norm) is a sum over all tokens whose
        # terms cancel, so bf16 rounding can move it by more than these bounds
        if grad is not None and grad.ndim >= 2 and grad.norm() > 0:
            assert _rel(gp_f[name], grad) < 3e-2, name


@pytest.mark.parametrize("kind", ["moe", "cartesian", "finedeep", "dsmoe"])
def test_fast_paths_in_float32_on_cuda_equal_the_eager_reference(kind):
    """Without autocast: the fast path (fused SwiGLU kernel, grouped op) against the eager
    experts loop and the plain formula, every gradient, to float32 rounding."""
    import os

    from tests.test_training import SMALL

    torch.manual_seed(0)
    fast = SMALL[kind].build(48).cuda()
    reference = copy.deepcopy(fast)
    for module in reference.modules():
        if hasattr(module, "impl"):
            module.impl = "eager"
    h = torch.randn(4, 64, 48, device="cuda")
    results = []
    for layer, kernels in ((fast, "1"), (reference, "0")):
        os.environ["FINEMOE_KERNELS"] = kernels
        try:
            x = h.clone().requires_grad_(True)
            out = layer(x)
            (out.update * h).sum().backward()
        finally:
            os.environ.pop("FINEMOE_KERNELS")
        results.append((out.update, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    _assert_same_results(*results)


def _dsmoe_and_its_masked_output(d_model: int, width: int, h_shape: tuple[int, int]):
    """A DSMoE layer at inference, an input, and the float32 masked path's output (every
    block computed, then weighted), with the gates that produced it."""
    from finemoe.layers import DSMoEConfig

    torch.manual_seed(0)
    layer = DSMoEConfig(intermediate_size=width, num_experts=8).build(d_model).cuda().eval()
    h = torch.randn(*h_shape, d_model, device="cuda")
    with torch.no_grad():
        u = layer.norm(h).reshape(-1, d_model)
        a, G, active = layer.gates(u)
        return layer, h, u, G, active, layer.masked_forward(u, a, G, active)


def test_dsmoe_sparse_inference_bf16_matches_the_masked_float32_path():
    layer, h, u, G, active, ref = _dsmoe_and_its_masked_output(256, 1024, (8, 256))
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sparse = layer.sparse_forward(u, G, active)
    assert 0.2 < float(active.float().mean()) < 0.8
    assert _rel(sparse, ref) < 1e-2


def test_dsmoe_prefill_forward_in_kernels_equals_the_masked_float32_path():
    """The layer's inference forward under bf16 autocast takes the kernel path (norm and
    gates, pair layout, gathered SwiGLU, grouped down products, per-token sums) and equals
    the masked float32 path; so does the same forward replayed as a CUDA graph."""
    layer, h, u, G, active, ref = _dsmoe_and_its_masked_output(512, 2048, (4, 300))
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert layer._prefilling(h.reshape(-1, 512), None)
            out = layer(h).update.reshape(-1, 512)
            graph = torch.cuda.CUDAGraph()
            layer(h)  # warm-up outside the capture (kernels compiled, weights cast)
            with torch.cuda.graph(graph):
                captured = layer(h).update
            graph.replay()
    assert 0.2 < float(active.float().mean()) < 0.8
    assert _rel(out, ref) < 1e-2
    assert _rel(captured.reshape(-1, 512), out) < 1e-6


@pytest.mark.parametrize("tokens", [1, 4])
def test_dsmoe_decoding_on_cuda_equals_the_masked_path(tokens):
    """The layer's forward for a few tokens at inference takes the decode kernels."""
    from finemoe.layers import DSMoEConfig

    torch.manual_seed(0)
    layer = DSMoEConfig(intermediate_size=4096, num_experts=8).build(1024).cuda().eval()
    h = torch.randn(1, tokens, 1024, device="cuda")
    with torch.no_grad():
        u = layer.norm(h).reshape(-1, 1024)
        assert layer._decoding(h.reshape(-1, 1024))
        out = layer(h).update.reshape(-1, 1024)
        a, G, active = layer.gates(u)
        ref = layer.masked_forward(u, a, G, active)
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_finedeep_gate_kernel_matches_the_pytorch_gate(gate):
    """gate_kernel=true against the same layer without it: float32 to rounding, and bf16
    autocast against float32 (output and input gradient, matrices' gradients)."""
    from finemoe.layers import FinedeepConfig

    torch.manual_seed(0)
    reference = FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=64, gate=gate,
                               gate_sum="experts", gate_kernel=False).build(256).cuda()
    fused = FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=64, gate=gate,
                           gate_sum="experts", gate_kernel=True).build(256).cuda()
    fused.load_state_dict(reference.state_dict())
    h = torch.randn(4, 256, 256, device="cuda")
    for autocast in (False, True):
        results = []
        for layer, use_autocast in ((fused, autocast), (reference, False)):
            x = h.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                out = layer(x)
            (out.update.float() * h).sum().backward()
            results.append((out.update.float(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
            layer.zero_grad()
        (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = results
        bound = 3e-2 if autocast else 1e-4
        assert _rel(out_f, out_r) < bound and _rel(gx_f, gx_r) < bound
        for name, grad in gp_r.items():
            if grad.ndim >= 2:
                assert _rel(gp_f[name], grad) < bound, (name, autocast)


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_fused_product_key_kernels_on_cuda_equal_the_eager_layer(kind):
    """Both kernels (retrieval and experts), float32 on the GPU, a pool of 256² experts and 2,048 tokens (most experts retrieved
    by several tokens: the per-row gradient pass sums several pairs): output and the
    gradient of the input and of every parameter, query, BatchNorm, sub-keys and tables;
    experts never retrieved get exactly zero gradient; a second backward gives bitwise
    the same table gradients (no atomic adds)."""
    from finemoe.layers import PEERConfig, PKMConfig

    config_type = PEERConfig if kind == "peer" else PKMConfig
    torch.manual_seed(0)
    eager = config_type(num_experts=256**2, num_heads=4, top_k=8, key_dim=64, retrieval_impl="eager",
                        experts_impl="eager").build(256).cuda()
    fused = eager.config.replace(retrieval_impl="triton", experts_impl="triton").build(256).cuda()
    fused.load_state_dict(eager.state_dict())
    h = torch.randn(4, 512, 256, device="cuda")
    results = []
    for layer in (eager, fused):
        x = h.clone().requires_grad_(True)
        out = layer(x).update
        (out * h).sum().backward()
        results.append((out, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_e, gx_e, gp_e), (out_f, gx_f, gp_f) = results
    torch.testing.assert_close(out_f, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_f, gx_e, atol=1e-4, rtol=1e-4)
    for name, grad in gp_e.items():
        torch.testing.assert_close(gp_f[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    table = gp_f["expert_out" if kind == "peer" else "values"]
    untouched = table.abs().sum(-1) == 0
    assert 0 < int(untouched.sum()) < table.shape[0]
    assert torch.equal(gp_e["expert_out" if kind == "peer" else "values"][untouched], table[untouched])
    fused.zero_grad(set_to_none=True)
    x = h.clone().requires_grad_(True)
    (fused(x).update * h).sum().backward()
    for name, param in fused.named_parameters():
        if name in ("expert_in", "expert_out", "values"):
            assert torch.equal(param.grad, gp_f[name]), name


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_table_copies_under_autocast_stay_within_bf16_rounding(kind):
    """Under bf16 autocast, the expert kernels reading bf16 copies of the retrieved rows
    against the same kernels reading the float32 tables and against the eager layer (a
    pool of 256² experts, 8,192 tokens: each row read many times, so ``auto`` takes the
    copies): output, input gradient and every matrix's gradient within bf16 rounding."""
    from finemoe.layers import PEERConfig, PKMConfig
    from finemoe.kernels.peer_experts import table_copies_pay

    config_type = PEERConfig if kind == "peer" else PKMConfig
    torch.manual_seed(0)
    base = config_type(num_experts=128**2, num_heads=4, top_k=8, key_dim=64)
    assert table_copies_pay(8192 * 4 * 8, 128**2, torch.bfloat16, torch.float32)
    layers = {name: base.replace(**options).build(256).cuda() for name, options in (
        ("copies", {"table_copies": "auto"}), ("tables", {"table_copies": "never"}),
        ("eager", {"retrieval_impl": "eager", "experts_impl": "eager"}))}
    for layer in layers.values():
        layer.load_state_dict(layers["eager"].state_dict())
    h = torch.randn(8, 1024, 256, device="cuda")
    results = {}
    for name, layer in layers.items():
        x = h.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x).update
        (out.float() * h).sum().backward()
        results[name] = (out.float(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad.ndim >= 2})
    for other in ("tables", "eager"):
        (out_c, gx_c, gp_c), (out_o, gx_o, gp_o) = results["copies"], results[other]
        assert _rel(out_c, out_o) < 1e-2 and _rel(gx_c, gx_o) < 2e-2, other
        for name, grad in gp_o.items():
            assert _rel(gp_c[name], grad) < 2e-2, (name, other)


@pytest.mark.parametrize("chunk_rows", [1000, None])
def test_chunked_linear_cross_entropy_on_cuda_matches_the_plain_form(chunk_rows):
    """The compiled chunk arithmetic under bf16 autocast against the plain form under autocast."""
    from finemoe.loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 256, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(5000, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, 5000, (4096,), device="cuda", generator=g)
    targets[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, chunk_rows=chunk_rows)
    loss.backward()
    got = loss.detach(), x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100)
    ref.backward()
    assert _rel(got[0], ref) < 1e-3
    assert _rel(got[1], x.grad) < 2e-2
    assert _rel(got[2], w.grad) < 2e-2


_COMPILED_KERNEL_LAYERS = {
    "moe": None, "cartesian": None, "dsmoe": None, "finedeep-gate-kernel": ("finedeep", {"gate_kernel": True}),
    "peer": ("peer", {"retrieval_impl": "triton", "experts_impl": "triton"}),
    "pkm": ("pkm", {"retrieval_impl": "triton", "experts_impl": "triton"}),
}


@pytest.mark.parametrize("name", sorted(_COMPILED_KERNEL_LAYERS))
def test_compiled_layers_with_finemoe_kernels_equal_eager(name):
    """Under ``torch.compile(fullgraph=True)`` finemoe's Triton operators are traced
    (``torch.library.triton_op``: Inductor launches the kernels itself) or kept opaque
    (``custom_op``, older torch): either way output and every gradient equal the eager
    call of the same layer, in float32, to rounding."""
    from tests.test_training import SMALL

    kind, changes = _COMPILED_KERNEL_LAYERS[name] or (name, {})
    torch.manual_seed(0)
    eager = SMALL[kind].replace(**changes).build(48).cuda()
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, fullgraph=True)
    h = torch.randn(4, 64, 48, device="cuda")
    results = []
    for layer, call in ((eager, eager), (compiled, run)):
        x = h.clone().requires_grad_(True)
        out = call(x).update
        (out * h).sum().backward()
        results.append((out, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    _assert_same_results(results[1], results[0])


_COMPILED_RETRIEVAL_AT_MODEL_SIZE = """
import copy, torch
from finemoe.layers import PEERConfig
torch.manual_seed(0)
eager = PEERConfig(num_experts=512**2, num_heads=8, top_k=16, key_dim=128).build(256).cuda()
compiled = copy.deepcopy(eager)
run = torch.compile(compiled, fullgraph=True)
h = torch.randn(8, 1024, 256, device="cuda")
for layer, call in ((eager, eager), (compiled, run)):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = call(h).update
    (out.float() * h).sum().backward()
torch.cuda.synchronize()
got, want = compiled.retrieval.sub_keys.grad, eager.retrieval.sub_keys.grad
torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
print("ok")
"""


def test_compiled_retrieval_at_model_size_stays_in_bounds():
    """Compiled PEER at s120m-peer's retrieval size (512 sub-keys, 8 heads, k = 16, 8,192
    tokens) runs and its sub-key gradient equals eager's. Regression: the sub-key
    gradient kernel wrote two views of one buffer, and Inductor's copy of a written view
    (torch <= 2.11, pytorch/pytorch#161115) read past its end: an illegal memory access
    in compiled s120m-peer and s20m-peer. In a fresh process without the caching
    allocator, where such a read leaves the allocation instead of landing in a cached
    neighbour."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    done = subprocess.run([sys.executable, "-c", _COMPILED_RETRIEVAL_AT_MODEL_SIZE], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_finemoe_operators_pass_opcheck_on_cuda():
    """The operators as registered on this torch (``triton_op`` or ``custom_op``):
    schema, fake tensors, autograd registration."""
    gate, up = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
    torch.library.opcheck(torch.ops.finemoe.swiglu.default, (gate.requires_grad_(True), up, torch.rand(8, 4, device="cuda")))
    gate_up = torch.randn(8, 128, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.finemoe.swiglu_packed.default, (gate_up, None, True))
    order = torch.randperm(12, device="cuda")
    position = torch.empty_like(order).scatter_(0, order, torch.arange(12, device="cuda"))
    y = torch.randn(12, 24, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.finemoe.sum_slots.default, (y, position, order, 3))
    torch.library.opcheck(torch.ops.finemoe.row_topk_indices.default, (torch.rand(64, 8, device="cuda"), 2))


@pytest.mark.parametrize("experts,k", [(8, 2), (64, 8), (256, 3)])
def test_router_topk_on_cuda_takes_the_kernel_and_equals_torch_topk(experts, k):
    """At the s120m presets' size the routers' top-k runs the register kernel and keeps
    torch.topk's experts; the weights (gathered) carry the probabilities' gradient."""
    from finemoe.kernels.topk import row_topk_supported
    from finemoe.layers.routing import topk_routing

    torch.manual_seed(experts)
    logits = torch.randn(32768, experts, device="cuda", requires_grad=True)
    probs = torch.softmax(logits, -1)
    assert row_topk_supported(probs, k)
    weights, idx = topk_routing(probs, k, renormalize=False)
    ref_weights, ref_idx = probs.topk(k, dim=-1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(weights.sum(), [logits], retain_graph=True)
    (ref_grad,) = torch.autograd.grad(ref_weights.sum(), [logits])
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("clipped", [False, True])
def test_row_sparse_adamw_on_cuda_takes_the_kernel_and_equals_the_reference(clipped):
    """RowSparseAdamW on a PEER-sized slice of table (4096 rows of 1024, a quarter never
    touched) for three steps: the kernel path against the PyTorch reference on the CPU;
    clipped, through ``clip_grad_norm_`` (the kernel that sums the rows' squares and flags
    the touched ones, and the update that reads the flags), the norms too."""
    from finemoe.optim import RowSparseAdamW

    torch.manual_seed(0)
    start = torch.randn(4096, 1024)
    tables = [torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone().cuda())]
    optimizers = [RowSparseAdamW([{"params": [t], "row_sparse": True}], lr=1e-3, weight_decay=0.1) for t in tables]
    for step in range(3):
        grad = torch.randn(4096, 1024)
        grad[torch.randperm(4096)[:1024]] = 0.0
        norms = []
        for table, optimizer in zip(tables, optimizers):
            table.grad = grad.to(table.device)
            if clipped:
                norms.append(optimizer.clip_grad_norm_(100.0).cpu())
            optimizer.step()
        if clipped:
            assert norms[0] > 100.0
            torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(tables[1].detach().cpu(), tables[0].detach(), atol=1e-6, rtol=1e-5)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optimizers[1].state[tables[1]][key].cpu(), optimizers[0].state[tables[0]][key],
                                   atol=1e-6, rtol=1e-5)


def _quack_or_skip():
    from finemoe.kernels import quack_experts

    if not quack_experts.quack_available(torch.zeros(1, device="cuda")):
        pytest.skip("needs the quack-kernels package and an sm90/sm100 GPU")
    return quack_experts


@pytest.mark.parametrize("routing", ["random", "two experts only", "all on one expert"])
def test_quack_experts_bf16_match_the_float32_eager_reference(routing, monkeypatch):
    """Token choice on QuACK's GEMMs (gather, SwiGLU and the weight gradients inside them)
    under bf16 against the eager per-expert loop in float32: output and the gradients of
    the input, the three weight banks and the routing weights, relative error < 2e-2;
    experts that receive no token get exactly zero gradient."""
    from finemoe.layers.experts import SwiGLUExperts, dispatch_token_choice

    monkeypatch.setattr(_quack_or_skip(), "_TUNED", False)  # QuACK's default tiles: no autotuning in a test
    torch.manual_seed(0)
    N, K, E, D, F_ = 1000, 2, 8, 256, 128
    fast = SwiGLUExperts(E, D, F_, impl="quack").cuda()
    reference = copy.deepcopy(fast)
    reference.impl = "eager"
    x = torch.randn(N, D, device="cuda")
    idx = {"random": torch.rand(N, E, device="cuda").topk(K, dim=1).indices,
           "two experts only": torch.stack([torch.full((N,), 3), torch.full((N,), 5)], 1).cuda(),
           "all on one expert": torch.stack([torch.full((N,), 6), torch.randint(0, 6, (N,))], 1).cuda()}[routing]
    weights = torch.rand(N, K, device="cuda")
    probe = torch.randn(N, D, device="cuda")
    results = []
    for experts, dtype in ((fast, torch.bfloat16), (reference, torch.float32)):
        xs, ws = x.to(dtype).requires_grad_(True), weights.clone().requires_grad_(True)
        out = dispatch_token_choice(experts, xs, ws, idx)
        (out.float() * probe).sum().backward()
        results.append((out.float(), xs.grad.float(), ws.grad, {n: p.grad for n, p in experts.named_parameters()}))
        experts.zero_grad(set_to_none=True)
    (out, gx, gw, gp), (out_r, gx_r, gw_r, gp_r) = results
    assert _rel(out, out_r) < 2e-2 and _rel(gx, gx_r) < 2e-2 and _rel(gw, gw_r) < 2e-2
    unused = torch.ones(E, dtype=torch.bool)
    unused[idx.unique().cpu()] = False
    for name, grad in gp_r.items():
        assert _rel(gp[name], grad) < 2e-2, name
        assert gp[name].dtype == torch.float32 and bool((gp[name][unused] == 0).all()), name


def test_quack_moe_layer_compiles_and_equals_its_eager_self(monkeypatch):
    """The layer with ``experts_impl: quack`` under ``torch.compile(fullgraph=True)``: the
    QuACK operators are opaque nodes with fake implementations; same output and gradients
    as the eager layer."""
    from finemoe.layers import MoEConfig

    monkeypatch.setattr(_quack_or_skip(), "_TUNED", False)
    torch.manual_seed(0)
    layer = MoEConfig(num_experts=8, num_experts_per_tok=2, expert_intermediate_size=128,
                      experts_impl="quack").build(256).cuda()
    h = torch.randn(2, 300, 256, device="cuda")
    runs = []
    for run in (layer, torch.compile(layer, fullgraph=True)):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(x).update
        out.float().square().sum().backward()
        runs.append((out.float(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
        layer.zero_grad(set_to_none=True)
    _assert_same_results(runs[0], runs[1], tol=2e-2)


@pytest.mark.parametrize("outputs", [3, 8])
def test_router_product_kernels_match_float64_eagerly_and_compiled(outputs):
    """``float32_linear`` at a router's shape takes the skinny-product kernels on the GPU
    (``finemoe.kernels.skinny_linear``): output, input and weight gradients against float64,
    eagerly and compiled with ``fullgraph=True`` under bf16 autocast (the router stays
    float32)."""
    from finemoe.kernels.skinny_linear import skinny_linear_applies
    from finemoe.layers.common import float32_linear

    torch.manual_seed(0)
    x = torch.randn(5000, 1024, device="cuda")
    w = torch.randn(outputs, 1024, device="cuda") * 0.02
    assert skinny_linear_applies(x, w)
    probe = torch.randn(5000, outputs, device="cuda")
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = x64 @ w64.T
    ref_grads = torch.autograd.grad((ref * probe.double()).sum(), (x64, w64))
    for fn in (float32_linear, torch.compile(float32_linear, fullgraph=True)):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xs, ws)
        assert out.dtype == torch.float32
        grads = torch.autograd.grad((out * probe).sum(), (xs, ws))
        assert _rel(out, ref) < 1e-6
        for got, want in zip(grads, ref_grads):
            assert got.dtype == torch.float32 and _rel(got, want) < 1e-6
