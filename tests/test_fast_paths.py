"""Fast paths against the eager references, on the CPU: the grouped GEMM op (both of
its branches), every routed layer with ``experts_impl`` set either way, DSMoE's sparse
inference, and ``torch.compile(fullgraph=True)`` of a model of every kind with no
recompilation once training has started."""

from __future__ import annotations

import copy

import pytest
import torch

from finemoe import ModelConfig, Transformer
from finemoe.kernels import grouped_mm, native_grouped_mm_supported
from finemoe.kernels.grouped_mm import grouped_mm_op
from finemoe.layers import CartesianConfig, DSMoEConfig, MoEConfig
from tests.helpers import B, D, T, randomise
from tests.test_training import SMALL


def naive_grouped(x, w, sizes):
    out, start = [], 0
    for e, size in enumerate(sizes):
        out.append(x[start:start + size] @ w[e])
        start += size
    return torch.cat(out)


GROUPS = {
    "awkward": [5, 0, 11, 3, 0, 7],      # empty groups in the middle
    "one expert takes all": [0, 0, 26, 0, 0, 0],
    "last empty": [9, 8, 9, 0, 0, 0],
}


@pytest.mark.parametrize("dtype,width", [(torch.float64, 24), (torch.float32, 24), (torch.float32, 20)])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_grouped_mm_equals_per_group_products(dtype, width, groups):
    """float64 runs the op's loop; float32 at width 24 (16-byte strides) torch's CPU
    kernel where this torch has one; width 20 falls back to the loop."""
    sizes = GROUPS[groups]
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), width, dtype=dtype, requires_grad=True)
    w = torch.randn(len(sizes), width, 12, dtype=dtype, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    probe = torch.randn(sum(sizes), 12, dtype=dtype)
    out = grouped_mm(x, w, offs)
    (out * probe).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = naive_grouped(x_ref, w_ref, sizes)
    (ref * probe).sum().backward()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)
    empty = [e for e, s in enumerate(sizes) if s == 0]
    assert torch.count_nonzero(w.grad[empty]) == 0  # an expert with no token gets exactly zero gradient


def test_grouped_mm_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and compile tracing agree."""
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(grouped_mm_op, (torch.randn(10, 8, dtype=dtype, requires_grad=True),
                                           torch.randn(4, 8, 16, dtype=dtype, requires_grad=True), offs))


def test_native_kernel_is_used_where_it_applies():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 16)
    assert native_grouped_mm_supported(x, w) == (torch.__version__ >= "2.9")
    assert not native_grouped_mm_supported(x.double(), w.double())
    assert not native_grouped_mm_supported(torch.randn(4, 5), torch.randn(2, 5, 16))  # 20-byte rows


ROUTED = {
    "token choice": MoEConfig(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12),
    "expert choice": MoEConfig(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12,
                               routing="expert_choice", capacity_factor=1.3),
    "segmented + shared (gate)": MoEConfig(num_experts=3, num_experts_per_tok=1, expert_intermediate_size=12,
                                           granularity=2, num_shared_experts=1, shared_mix="gate"),
    "top-1 disabled": MoEConfig(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12, disable_top1=True),
    "cartesian": CartesianConfig.with_sublayer(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=12),
}


def _run(layer, h, probe):
    h = h.detach().clone().requires_grad_(True)
    out = layer(h)
    loss = (out.update * probe).sum() + sum(out.aux_losses.values())
    loss.backward()
    return out.update.detach(), h.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ROUTED))
def test_grouped_experts_equal_the_eager_loop(name, dtype):
    """Outputs and every gradient; float32 at these widths runs torch's CPU kernel."""
    torch.manual_seed(0)
    eager = randomise(ROUTED[name].replace(experts_impl="eager").build(D)).to(dtype)
    fast = ROUTED[name].replace(experts_impl="grouped_mm").build(D).to(dtype)
    fast.load_state_dict(eager.state_dict())
    h = torch.randn(B, T, D, dtype=dtype)
    probe = torch.randn(B, T, D, dtype=dtype)
    got, ref = _run(fast, h, probe), _run(eager, h, probe)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for key, grad in ref[2].items():
        torch.testing.assert_close(got[2][key], grad, **tol, msg=lambda m: f"gradient of {key}: {m}")


@pytest.mark.parametrize("num_experts", [1, 7, 255, 256, 300, 40000])
def test_sort_and_count_by_expert_equal_argsort_and_bincount(num_experts):
    """The narrow sort keys (uint8 below 256 experts, int16, int32) give torch's stable
    int64 argsort and bincount, experts without a slot included."""
    from finemoe.layers.routing import count_per_expert, sort_by_expert

    g = torch.Generator().manual_seed(num_experts)
    idx = torch.randint(0, num_experts, (97, 3), generator=g)
    idx[0, 0] = num_experts - 1  # the largest id occurs
    sorted_ids, order = sort_by_expert(idx, num_experts)
    assert torch.equal(order, torch.argsort(idx.reshape(-1), stable=True))
    assert torch.equal(sorted_ids.long(), idx.reshape(-1)[order])
    counts = count_per_expert(idx, num_experts)
    assert counts.dtype == torch.long
    assert torch.equal(counts, torch.bincount(idx.reshape(-1), minlength=num_experts))


def test_all_tokens_on_one_expert():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=1, expert_intermediate_size=12, norm_topk_prob=False)
    eager = randomise(cfg.replace(experts_impl="eager").build(D)).double()
    fast = cfg.build(D).double()
    with torch.no_grad():
        eager.router.weight.zero_()
        eager.router.weight[2] = 5.0  # with positive inputs every token picks expert 2
    fast.load_state_dict(eager.state_dict())
    h = torch.rand(B, T, D, dtype=torch.float64) + 0.1
    probe = torch.randn(B, T, D, dtype=torch.float64)
    got, ref = _run(fast, h, probe), _run(eager, h, probe)
    torch.testing.assert_close(got[0], ref[0])
    for key in ("experts.w_gate_up", "experts.w_down"):
        torch.testing.assert_close(got[2][key], ref[2][key])
        assert torch.count_nonzero(got[2][key][[0, 1, 3]]) == 0


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_dsmoe_sparse_inference_equals_the_masked_path(impl):
    torch.manual_seed(0)
    layer = randomise(DSMoEConfig(intermediate_size=48, num_experts=6, experts_impl=impl).build(D)).double().eval()
    h = torch.randn(B, T, D, dtype=torch.float64)
    u = layer.norm(h).reshape(-1, D)
    a, G, active = layer.gates(u)
    assert 0 < active.float().mean() < 1  # some blocks on, some off
    torch.testing.assert_close(layer.sparse_forward(u, G, active), layer.masked_forward(u, a, G, active))


# -- compilation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_a_model_of_every_kind_compiles_fullgraph_and_does_not_recompile(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=4, max_seq_len=32, ffn=SMALL[kind])
    model = Transformer(cfg)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):
        tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(step))
        if step == 2:  # warm-up done: any further compilation is an error
            torch._dynamo.config.error_on_recompile = True
        try:
            out = compiled(tokens[:, :-1], tokens[:, 1:])
        finally:
            torch._dynamo.config.error_on_recompile = False
        if step == 0:
            ref = reference(tokens[:, :-1], tokens[:, 1:])
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_statistics_records_compile_fullgraph_and_equal_eager(kind):
    """The trainer asks for statistics at logging steps inside its compiled step: every
    kind's records are made without graph breaks or data-dependent shapes, and say what
    the eager call's records say."""
    from finemoe.metrics import layer_stat_summary

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=4, max_seq_len=32, ffn=SMALL[kind])
    model = Transformer(cfg)
    tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    eager = model(tokens[:, :-1], tokens[:, 1:], return_stats=True)
    compiled = torch.compile(model, fullgraph=True)(tokens[:, :-1], tokens[:, 1:], return_stats=True)
    expected, got = layer_stat_summary(eager.layer_stats), layer_stat_summary(compiled.layer_stats)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_quack_experts_fall_back_to_grouped_mm_off_the_gpu():
    """``experts_impl: quack`` where QuACK cannot run (the CPU, float64): the grouped_mm
    path, so the same model runs anywhere; output and gradients equal grouped_mm's."""
    torch.manual_seed(0)
    quack = randomise(MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16,
                                experts_impl="quack").build(D)).double()
    grouped = copy.deepcopy(quack)
    for module in grouped.modules():
        if hasattr(module, "impl"):
            module.impl = "grouped_mm"
    h, probe = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    got, want = _run(quack, h, probe), _run(grouped, h, probe)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for key, grad in want[2].items():
        torch.testing.assert_close(got[2][key], grad, rtol=0, atol=0)
