"""Each FFN kind against a naive float64 reference: outputs and every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from finemoe.layers import DenseConfig, MoEConfig
from tests import reference as ref
from tests.helpers import B, D, T, compare_with_reference, randomise, with_records


def test_dense_matches_reference():
    cfg = DenseConfig(intermediate_size=40)
    layer = randomise(cfg.build(D))
    compare_with_reference(layer, lambda h, p: (ref.dense_ffn(h, p, cfg.norm_eps),))


MOE_CASES = {
    "top3_of_6": MoEConfig(num_experts=6, num_experts_per_tok=3, expert_intermediate_size=40),
    "no_renorm": MoEConfig(num_experts=6, num_experts_per_tok=2, expert_intermediate_size=40, norm_topk_prob=False),
    "fine_grained_shared": MoEConfig(
        num_experts=5, num_experts_per_tok=2, expert_intermediate_size=40, granularity=2, num_shared_experts=2,
        shared_expert_intermediate_size=12,
    ),
    "gated_shared_scaled": MoEConfig(
        num_experts=5, num_experts_per_tok=2, expert_intermediate_size=40, num_shared_experts=1, shared_mix="gate",
        routed_scaling_factor=2.5,
    ),
    "top1": MoEConfig(num_experts=4, num_experts_per_tok=1, expert_intermediate_size=40),
    "disable_top1": MoEConfig(num_experts=6, num_experts_per_tok=2, expert_intermediate_size=40, disable_top1=True),
    "expert_choice": MoEConfig(
        num_experts=6, num_experts_per_tok=2, expert_intermediate_size=40, routing="expert_choice", capacity_factor=1.3
    ),
    "expert_choice_disable_top1": MoEConfig(
        num_experts=6, num_experts_per_tok=2, expert_intermediate_size=40, routing="expert_choice", disable_top1=True
    ),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_matches_reference(case):
    cfg = MOE_CASES[case]
    layer = randomise(cfg.build(D))
    out, (lb_ref, z_ref) = compare_with_reference(layer, lambda h, p: ref.moe_ffn(h, p, cfg))
    # The auxiliary losses, each times its coefficient.
    torch.testing.assert_close(out.aux_losses["router_z"], cfg.router_z_loss_coef * z_ref)
    if cfg.routing == "token_choice":
        torch.testing.assert_close(out.aux_losses["load_balancing"], cfg.router_aux_loss_coef * lb_ref)
    else:
        assert "load_balancing" not in out.aux_losses  # expert choice is balanced by construction


def test_moe_load_balancing_loss_is_one_when_uniform():
    """A zero router gives uniform probabilities: E · Σ (1/E)(1/E) = 1 whatever the top-k picks."""
    cfg = MoEConfig(num_experts=8, num_experts_per_tok=2, expert_intermediate_size=16, router_aux_loss_coef=1.0)
    layer = cfg.build(D)
    with torch.no_grad():
        layer.router.weight.zero_()
    out, records = with_records(layer, torch.randn(2, 5, D))
    torch.testing.assert_close(out.aux_losses["load_balancing"], torch.tensor(1.0))
    assert records["routing"].scalars()["router_entropy"] == pytest.approx(math.log(8.0))


def test_moe_statistics_for_a_router_that_sends_everything_to_one_expert():
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=1, expert_intermediate_size=16)
    layer = cfg.build(D)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.norm.weight.fill_(1.0)
    # A constant positive input and a router that only sees feature 0 of expert 2.
    h = torch.ones(2, 5, D)
    with torch.no_grad():
        layer.router.weight[2, 0] = 100.0
    _, records = with_records(layer, h)
    assert records["routing"].summary()["routing"]["token_share"] == [0.0, 0.0, 1.0, 0.0]


def test_disable_top1_never_uses_the_top1_expert():
    """With the robustness switch, a token's output must not depend on its top-1 expert."""
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=6, num_experts_per_tok=2, expert_intermediate_size=16, disable_top1=True)
    layer = cfg.build(D)
    h = torch.randn(1, 1, D)
    u = layer.norm(h).reshape(1, D)
    top1 = int((u @ layer.router.weight.T).argmax())
    before = layer(h).update
    with torch.no_grad():
        layer.experts.w_down[top1].mul_(1000.0)
    torch.testing.assert_close(layer(h).update, before)


def test_moe_under_bf16_autocast_keeps_router_in_float32(monkeypatch):
    from finemoe.layers import routing

    cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16)
    layer = cfg.build(D)
    seen = {}
    original = routing.router_probs

    def spy(logits):
        seen["logits_dtype"] = logits.dtype
        return original(logits)

    monkeypatch.setattr(routing, "router_probs", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, D))
    assert seen["logits_dtype"] == torch.float32
    assert out.aux_losses["router_z"].dtype == torch.float32


def test_disable_top1_as_a_run_time_intervention_equals_the_config_option():
    """The intervention changes what the layer computes for the duration of the block
    only, and the same way as the config option; its config is never touched."""
    from finemoe.layers import intervention

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=6, num_experts_per_tok=2, expert_intermediate_size=16)
    layer = cfg.build(D)
    switched = cfg.replace(disable_top1=True).build(D)
    switched.load_state_dict(layer.state_dict())
    h = torch.randn(B, T, D)
    normal = layer(h).update
    with intervention(layer, "disable_top1") as reached:
        assert reached == 1 and layer.config is cfg
        torch.testing.assert_close(layer(h).update, switched(h).update)
    torch.testing.assert_close(layer(h).update, normal)
    every_expert = MoEConfig(num_experts=2, num_experts_per_tok=2, expert_intermediate_size=16).build(D)
    with intervention(every_expert, "disable_top1") as reached:
        assert reached == 0  # a layer that routes to every expert cannot skip its top-1


def test_finedeep_readout_stays_float32_in_the_compiled_backward():
    """Finedeep's output-guided read-out ``r_k = W_{d,k} w_k`` under bf16 autocast: the
    router's gradient, eager and compiled, against the float64 formula (an einsum inside
    ``autocast(enabled=False)`` got a bf16 backward when compiled, 2.6e-3 off)."""
    from finemoe.layers.finedeep import FinedeepConfig

    torch.manual_seed(0)
    layer = FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=48).build(64)
    probe = torch.randn(4, 48, dtype=torch.float64)
    w_down, router = layer.w_down[1].detach().double(), layer.router[1].detach().double()
    want_w_down = probe[:, :, None] * router[:, None, :]
    want_router = (probe[:, :, None] * w_down).sum(1)
    for readout in (layer._readout, torch.compile(layer._readout, fullgraph=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = readout(1)
        assert r.dtype == torch.float32
        torch.testing.assert_close(r.double(), (w_down * router[:, None, :]).sum(-1), atol=1e-6, rtol=1e-6)
        g_w_down, g_router = torch.autograd.grad((r * probe.float()).sum(), [layer.w_down, layer.router])
        torch.testing.assert_close(g_w_down[1].double(), want_w_down, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_router[1].double(), want_router, atol=1e-6, rtol=1e-6)
        assert g_w_down[0].abs().max() == 0 and g_router[0].abs().max() == 0


@pytest.mark.parametrize("bias", [False, True])
def test_router_products_stay_float32_in_the_compiled_backward(bias):
    """``float32_linear`` under bf16 autocast: compiled, its gradients are float32 products
    as they are eagerly (a product inside ``autocast(enabled=False)`` gets a bf16 backward
    from AOTAutograd, ~3e-3 off). Against the float64 formula."""
    from finemoe.layers.common import float32_linear

    torch.manual_seed(0)
    x = torch.randn(3, 40, 64, requires_grad=True)
    w = torch.randn(10, 64, requires_grad=True)
    b = torch.randn(10, requires_grad=True) if bias else None
    probe = torch.randn(3, 40, 10)
    params = [x, w] + ([b] if bias else [])
    xd, wd, pd = x.detach().double(), w.detach().double(), probe.double()
    want = [pd @ wd, pd.reshape(-1, 10).t() @ xd.reshape(-1, 64)] + ([pd.sum((0, 1))] if bias else [])
    for fn in (float32_linear, torch.compile(float32_linear, fullgraph=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        assert y.dtype == torch.float32
        grads = torch.autograd.grad((y * probe).sum(), params)
        for got, ref in zip(grads, want):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)


def test_expert_bank_interleaves_gate_and_up_and_reads_the_layout_before_it():
    """``experts.w_gate_up`` holds the gate's column j at 2j and the up projection's at
    2j + 1 (the views ``w_gate``/``w_up`` read them back); a state dict of the earlier
    layout, ``w_gate`` and ``w_up`` as two banks, loads into it unchanged."""
    torch.manual_seed(0)
    layer = randomise(MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=6).build(D)).double()
    bank = layer.experts.w_gate_up.detach()
    assert bank.shape == (4, D, 12)
    torch.testing.assert_close(layer.experts.w_gate, bank[:, :, [0, 2, 4, 6, 8, 10]], rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w_up, bank[:, :, [1, 3, 5, 7, 9, 11]], rtol=0, atol=0)
    legacy = {k: v for k, v in layer.state_dict().items() if k != "experts.w_gate_up"}
    legacy["experts.w_gate"], legacy["experts.w_up"] = bank[..., 0::2].clone(), bank[..., 1::2].clone()
    restored = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=6).build(D).double()
    restored.load_state_dict(legacy)
    torch.testing.assert_close(restored.experts.w_gate_up, bank, rtol=0, atol=0)
    h = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(restored(h).update, layer(h).update, rtol=0, atol=0)
