"""The four designs (and PKM) against naive references and the properties METHODS.md asks for."""

from __future__ import annotations

import pytest
import torch

from finemoe.config import ConfigError
from finemoe.convert import split_dense_ffn
from finemoe.layers import (
    CallContext,
    CartesianConfig,
    DenseConfig,
    DSMoEConfig,
    FinedeepConfig,
    HashConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    TopPConfig,
)
from finemoe.layers.routing import product_key_topk
from tests import reference as ref
from tests.helpers import D, compare_with_reference, randomise, with_records

# -- Finedeep ------------------------------------------------------------------------------------

FINEDEEP_CASES = {
    "M2_K3": FinedeepConfig(num_sublayers=2, experts_per_sublayer=3, expert_intermediate_size=10),
    "M3_K2_unnormalised": FinedeepConfig(num_sublayers=3, experts_per_sublayer=2, expert_intermediate_size=7, normalize=False),
    "sublayer_input_router": FinedeepConfig(num_sublayers=2, experts_per_sublayer=3, expert_intermediate_size=10,
                                            router_input="sublayer_input"),
    "softmax_gate": FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=5, gate="softmax"),
    "gates_sum_to_K": FinedeepConfig(num_sublayers=2, experts_per_sublayer=3, expert_intermediate_size=6, gate_sum="experts"),
}


@pytest.mark.parametrize("case", sorted(FINEDEEP_CASES))
def test_finedeep_matches_reference(case):
    cfg = FINEDEEP_CASES[case]
    layer = randomise(cfg.build(D))
    compare_with_reference(layer, lambda h, p: ref.finedeep_ffn(h, p, cfg))


def test_finedeep_with_one_sublayer_and_one_expert_is_a_dense_prenorm_ffn():
    """M = K = 1: the normalised gate s/s is exactly 1, so h + update = h + SwiGLU(RMSNorm(h))."""
    dense = randomise(DenseConfig(intermediate_size=40).build(D)).double()
    fd = FinedeepConfig.matching_dense(DenseConfig(intermediate_size=40), 1, 1).build(D).double()
    with torch.no_grad():
        fd.norms[0].weight.copy_(dense.norm.weight)
        fd.w_gate[0].copy_(dense.mlp.gate_proj.weight.t())
        fd.w_up[0].copy_(dense.mlp.up_proj.weight.t())
        fd.w_down[0, 0].copy_(dense.mlp.down_proj.weight.t())
        fd.router.normal_()  # any router: the single gate normalises to 1
    h = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(h + fd(h).update, h + dense(h).update, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate_sum, scale", [("experts", 1.0), ("one", 1 / 4)])
def test_finedeep_one_sublayer_with_equal_gates_is_the_dense_ffn_or_a_Kth_of_it(gate_sum, scale):
    """M = 1, K = 4, a zero router (all scores equal): gates summing to K give exactly the
    dense FFN the experts were cut from; gates summing to 1 give a quarter of it."""
    dense = randomise(DenseConfig(intermediate_size=40).build(D)).double()
    fd = FinedeepConfig.matching_dense(DenseConfig(intermediate_size=40), 1, 4, gate_sum=gate_sum).build(D).double()
    with torch.no_grad():
        fd.norms[0].weight.copy_(dense.norm.weight)
        fd.w_gate[0].copy_(dense.mlp.gate_proj.weight.t())
        fd.w_up[0].copy_(dense.mlp.up_proj.weight.t())
        fd.w_down[0].copy_(dense.mlp.down_proj.weight.t().reshape(4, 10, D))
        fd.router.zero_()
    h = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(fd(h).update, scale * dense(h).update, rtol=1e-12, atol=1e-12)


def test_finedeep_gate_sum_needs_normalised_gates():
    with pytest.raises(ConfigError, match="gate_sum"):
        FinedeepConfig(normalize=False, gate_sum="experts")


@pytest.mark.parametrize("M,K", [(1, 16), (2, 8), (4, 4), (8, 2)])
def test_finedeep_matching_dense_has_dense_params_and_flops(M, K):
    dense = DenseConfig(intermediate_size=2048)
    fd = FinedeepConfig.matching_dense(dense, M, K)
    assert fd.total_width == 2048
    d_model = 512
    # Equal up to the routers (M·K·D) and the extra norms ((M−1)·D): under 1% here.
    assert fd.num_params(d_model) - dense.num_params(d_model) == M * K * d_model + (M - 1) * d_model
    assert abs(fd.num_params(d_model) / dense.num_params(d_model) - 1) < 0.01
    assert abs(fd.flops_per_token(d_model) / dense.flops_per_token(d_model) - 1) < 0.01


# -- DSMoE -------------------------------------------------------------------------------------------

DSMOE_CASES = {
    "ste_rescale": DSMoEConfig(intermediate_size=40, num_experts=5),
    "no_ste": DSMoEConfig(intermediate_size=40, num_experts=5, straight_through=False),
    "no_rescale_tau_0.8": DSMoEConfig(intermediate_size=40, num_experts=4, rescale=False, threshold=0.8),
}


@pytest.mark.parametrize("case", sorted(DSMOE_CASES))
def test_dsmoe_matches_reference_in_training(case):
    cfg = DSMOE_CASES[case]
    layer = randomise(cfg.build(D)).train()
    out, (g_mean,) = compare_with_reference(layer, lambda h, p: ref.dsmoe_ffn(h, p, cfg))
    torch.testing.assert_close(out.aux_losses["sparsity"], cfg.sparsity_loss_coef * g_mean / cfg.num_experts)


def _dense_and_split(cfg: DSMoEConfig):
    torch.manual_seed(0)
    dense = randomise(DenseConfig(intermediate_size=cfg.intermediate_size).build(D)).double()
    layer = cfg.build(D).double()
    layer.load_state_dict(split_dense_ffn(dense.state_dict(), cfg, generator=torch.Generator().manual_seed(1)))
    return dense, layer


def test_dsmoe_split_with_all_gates_open_and_no_rescale_is_the_dense_ffn(monkeypatch):
    cfg = DSMoEConfig(intermediate_size=40, num_experts=8, rescale=False)
    dense, layer = _dense_and_split(cfg)

    def all_open(u):
        ones = torch.ones(u.shape[0], cfg.num_experts, dtype=u.dtype)
        return ones, ones, ones.bool()

    monkeypatch.setattr(layer, "gates", all_open)
    h = torch.randn(3, 5, D, dtype=torch.float64)
    for mode in (layer.train, layer.eval):  # masked and sparse paths
        mode()
        torch.testing.assert_close(layer(h).update, dense(h).update, rtol=1e-12, atol=1e-12)


def _one_token_with_inactive_blocks(cfg):
    torch.manual_seed(4)
    layer = randomise(cfg.build(D)).double().train()
    for _ in range(100):
        h = torch.randn(1, 1, D, dtype=torch.float64)
        _, _, active = layer.gates(layer.norm(h).reshape(1, D))
        if 0 < int(active.sum()) < cfg.num_experts:
            return layer, h, active[0]
    raise AssertionError("no token with a mix of active and inactive blocks")


def test_dsmoe_ste_gives_gate_gradient_through_inactive_blocks_and_experts_none():
    cfg = DSMoEConfig(intermediate_size=40, num_experts=5, sparsity_loss_coef=0.0)
    layer, h, active = _one_token_with_inactive_blocks(cfg)
    layer(h).update.sum().backward()
    b = cfg.block_width
    for i in range(cfg.num_experts):
        cols = slice(i * b, (i + 1) * b)
        expert_grad = layer.mlp.gate_proj.weight.grad[cols].abs().sum() + layer.mlp.down_proj.weight.grad[:, cols].abs().sum()
        assert layer.gate.weight.grad[i].abs().sum() > 0, f"gate {i} got no gradient"
        if active[i]:
            assert expert_grad > 0
        else:
            assert expert_grad == 0, f"inactive block {i} got gradient"


def test_dsmoe_without_ste_gives_no_gate_gradient_through_inactive_blocks():
    cfg = DSMoEConfig(intermediate_size=40, num_experts=5, sparsity_loss_coef=0.0, straight_through=False)
    layer, h, active = _one_token_with_inactive_blocks(cfg)
    layer(h).update.sum().backward()
    for i in range(cfg.num_experts):
        assert (layer.gate.weight.grad[i].abs().sum() > 0) == bool(active[i])


def test_dsmoe_sparse_eval_path_equals_masked_path():
    cfg = DSMoEConfig(intermediate_size=48, num_experts=6)
    layer = randomise(cfg.build(D)).double().eval()
    h = torch.randn(4, 9, D, dtype=torch.float64)
    out, records = with_records(layer, h)  # eval: the sparse path
    u = layer.norm(h).reshape(-1, D)
    a, G, active = layer.gates(u)
    share = records["active_blocks"].summary()["active_blocks"]["active_share"]
    assert 0 < share < 1
    torch.testing.assert_close(out.update.reshape(-1, D), layer.masked_forward(u, a, G, active), rtol=1e-12, atol=1e-12)
    assert share == pytest.approx(float(active.double().mean()))
    assert layer.config.measured_active_share(records["active_blocks"].summary()) == share


def test_dsmoe_no_active_block_gives_zero():
    cfg = DSMoEConfig(intermediate_size=16, num_experts=4, threshold=0.99)
    layer = cfg.build(D)
    with torch.no_grad():
        layer.gate.weight.zero_()  # a = 0.5 < τ everywhere
    for mode in (layer.train, layer.eval):
        mode()
        assert layer(torch.randn(2, 3, D)).update.abs().max() == 0


def test_moe_split_with_every_expert_and_uniform_router_is_the_dense_ffn():
    """The LLaMA-MoE baseline from the same partition: k = n, uniform router → dense."""
    dense_cfg = DenseConfig(intermediate_size=40)
    dense = randomise(dense_cfg.build(D)).double()
    cfg = MoEConfig.from_dense(dense_cfg, num_experts=8, top_k=8)
    layer = cfg.build(D).double()
    layer.load_state_dict(split_dense_ffn(dense.state_dict(), cfg))
    with torch.no_grad():
        layer.router.weight.zero_()
    h = torch.randn(3, 5, D, dtype=torch.float64)
    torch.testing.assert_close(layer(h).update, dense(h).update, rtol=1e-12, atol=1e-12)


# -- CartesianMoE --------------------------------------------------------------------------------------

CARTESIAN_CASES = {
    "gate_mix": CartesianConfig.with_sublayer(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12),
    "add_mix_top3": CartesianConfig.with_sublayer(num_experts=6, num_experts_per_tok=3, expert_intermediate_size=12, shared_mix="add"),
    "no_shared": CartesianConfig.with_sublayer(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12,
                                 num_shared_experts=0, shared_mix="add"),
    "disable_top1": CartesianConfig.with_sublayer(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=12, disable_top1=True),
}


@pytest.mark.parametrize("case", sorted(CARTESIAN_CASES))
def test_cartesian_matches_reference(case):
    cfg = CARTESIAN_CASES[case]
    layer = randomise(cfg.build(D))
    out, (lb_ref,) = compare_with_reference(layer, lambda h, p: ref.cartesian_ffn(h, p, cfg))
    torch.testing.assert_close(out.aux_losses["load_balancing"], cfg.sublayer.router_aux_loss_coef * lb_ref)


@pytest.mark.parametrize("disable_top1", [True, False])
def test_cartesian_robustness_switch_never_uses_top1_experts(disable_top1):
    """Per token: spoil the top-1 expert of sub-layer A and of sub-layer B; with the switch
    on, the output is unchanged; with it off, it changes."""
    cfg = CartesianConfig.with_sublayer(num_experts=6, num_experts_per_tok=2, expert_intermediate_size=12, disable_top1=disable_top1)
    torch.manual_seed(0)
    layer = randomise(cfg.build(D)).double()
    for _ in range(5):
        h = torch.randn(1, 1, D, dtype=torch.float64)
        before = layer(h).update
        A, Bl = layer.sublayers
        top1_a = int((A.norm(h).reshape(1, D) @ A.router.weight.t()).argmax())
        h_prime = h + A(h).update
        top1_b = int((Bl.norm(h_prime).reshape(1, D) @ Bl.router.weight.t()).argmax())
        saved = (A.experts.w_down[top1_a].clone(), Bl.experts.w_down[top1_b].clone())
        with torch.no_grad():
            A.experts.w_down[top1_a].mul_(-50.0)
            Bl.experts.w_down[top1_b].mul_(-50.0)
        after = layer(h).update
        with torch.no_grad():
            A.experts.w_down[top1_a].copy_(saved[0])
            Bl.experts.w_down[top1_b].copy_(saved[1])
        assert torch.equal(before, after) == disable_top1


def test_cartesian_is_two_sequential_moe_sublayers():
    cfg = CartesianConfig.with_sublayer(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=8)
    layer = cfg.build(D)
    h = torch.randn(2, 3, D)
    A, Bl = layer.sublayers
    h1 = h + A(h).update
    torch.testing.assert_close(h + layer(h).update, h1 + Bl(h1).update)
    assert cfg.num_composite_experts == 16


def test_cartesian_sublayers_take_any_moe_option_and_old_flat_configs_still_load():
    """The sub-layer is a full MoE config: an option CartesianConfig never copied
    (expert-choice routing, scaling) reaches both sub-layers; a config written flat (the
    shorthand, and every config saved before) gives the same layer as the nested form."""
    from finemoe.config import ConfigError, from_dict, to_dict
    from finemoe.layers import FFNConfig, MoEConfig

    cfg = from_dict(FFNConfig, {"kind": "cartesian", "sublayer": {"num_experts": 4, "expert_intermediate_size": 8,
                                                                  "routing": "expert_choice",
                                                                  "routed_scaling_factor": 2.0}})
    layer = cfg.build(D)
    assert [s.config.routing for s in layer.sublayers] == ["expert_choice"] * 2
    assert [s.config.routed_scaling_factor for s in layer.sublayers] == [2.0] * 2
    assert cfg.sublayer.shared_mix == "gate" and cfg.sublayer.num_shared_experts == 1  # the paper's, not moe's
    flat = from_dict(FFNConfig, {"kind": "cartesian", "num_experts": 4, "expert_intermediate_size": 8})
    assert flat == CartesianConfig.with_sublayer(num_experts=4, expert_intermediate_size=8)
    assert from_dict(FFNConfig, to_dict(flat)) == flat
    assert flat.replace(experts_impl="eager").sublayer.experts_impl == "eager"
    assert isinstance(flat.sublayer, MoEConfig)
    with pytest.raises(ConfigError, match="sublayer"):
        from_dict(FFNConfig, {"kind": "cartesian", "sublayer": {"kind": "topp"}})


# -- PEER and PKM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,k,heads", [(13, 5, 3), (7, 7, 1), (32, 16, 2)])
def test_product_key_topk_equals_brute_force(S, k, heads):
    torch.manual_seed(S)
    Kd = 10
    q = torch.randn(37, heads, Kd, dtype=torch.float64)
    C1, C2 = torch.randn(S, Kd // 2, dtype=torch.float64), torch.randn(S, Kd // 2, dtype=torch.float64)
    scores, idx = product_key_topk(q, C1, C2, k)
    full = torch.cat([C1.repeat_interleave(S, 0), C2.repeat(S, 1)], dim=1)  # key of expert a·S + b
    brute_scores, brute_idx = (q @ full.t()).topk(k, dim=-1)
    torch.testing.assert_close(scores, brute_scores)
    assert torch.equal(idx, brute_idx)


def test_product_key_scores_have_a_float32_backward_when_compiled():
    """The retrieved scores' gradients (to the query and both sub-key tables) under bf16
    autocast, eager and compiled, against float64: the sub-key products stay float32 in
    the backward (a product inside ``autocast(enabled=False)`` gets a bf16 one under
    torch.compile)."""
    torch.manual_seed(0)
    q = torch.randn(37, 2, 16, requires_grad=True)
    C1, C2 = torch.randn(13, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    probe = torch.randn(37, 2, 5)
    with torch.no_grad():
        _, idx = product_key_topk(q.double(), C1.double(), C2.double(), 5)
    a, b = idx // 13, idx % 13  # the retrieved experts' sub-key rows
    qd, C1d, C2d, pd = q.detach().double(), C1.detach().double(), C2.detach().double(), probe.double()
    want_q = torch.cat([(pd.unsqueeze(-1) * C1d[a]).sum(2), (pd.unsqueeze(-1) * C2d[b]).sum(2)], dim=-1)
    want_C1 = torch.zeros_like(C1d).index_add_(0, a.flatten(), (pd.unsqueeze(-1) * qd[..., None, :8]).reshape(-1, 8))
    want_C2 = torch.zeros_like(C2d).index_add_(0, b.flatten(), (pd.unsqueeze(-1) * qd[..., None, 8:]).reshape(-1, 8))
    for topk in (product_key_topk, torch.compile(product_key_topk, fullgraph=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores, got_idx = topk(q, C1, C2, 5)
        assert scores.dtype == torch.float32 and torch.equal(got_idx, idx)
        grads = torch.autograd.grad((scores * probe).sum(), [q, C1, C2])
        for got, want in zip(grads, (want_q, want_C1, want_C2)):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


PK_CASES = {
    "peer_gelu_softmax": PEERConfig(num_experts=49, num_heads=3, top_k=4, key_dim=6),
    "peer_relu_sigmoid_no_bn": PEERConfig(num_experts=36, num_heads=2, top_k=5, key_dim=8, activation="relu",
                                          gate="sigmoid", query_batchnorm=False),
    "pkm": PKMConfig(num_experts=49, num_heads=2, top_k=6, key_dim=6),
}


@pytest.mark.parametrize("case", sorted(PK_CASES))
def test_product_key_layers_match_brute_force_reference(case):
    cfg = PK_CASES[case]
    layer = randomise(cfg.build(D)).train()  # BatchNorm with batch statistics
    compare_with_reference(layer, lambda h, p: ref.product_key_ffn(h, p, cfg, peer=cfg.kind == "peer"))


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_only_retrieved_experts_matter(kind):
    cfg = (PEERConfig if kind == "peer" else PKMConfig)(num_experts=400, num_heads=2, top_k=3, key_dim=8)
    torch.manual_seed(0)
    layer = cfg.build(D).eval()
    h = torch.randn(2, 5, D)
    out, records = with_records(layer, h)
    mass = records["product_keys"].mass.sum(0)
    unused, used = int((mass == 0).nonzero()[0]), int(mass.argmax())
    tables = [layer.expert_in, layer.expert_out] if kind == "peer" else [layer.values]
    with torch.no_grad():
        for table in tables:
            table[unused].normal_(0, 10.0)
    assert torch.equal(layer(h).update, out.update)
    with torch.no_grad():
        for table in tables:
            table[used].normal_(0, 10.0)
    assert not torch.allclose(layer(h).update, out.update)


def test_peer_never_materialises_a_tensor_of_tokens_times_experts():
    """Every tensor the forward and backward create is far smaller than N_tokens × N_experts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = PEERConfig(num_experts=128**2, num_heads=4, top_k=8, key_dim=16)
    layer = cfg.build(16)
    h = torch.randn(4, 32, 16, requires_grad=True)
    limit = 4 * 32 * cfg.num_experts
    largest = {"numel": 0}

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    largest["numel"] = max(largest["numel"], t.numel())
            return result

    with Sizes():
        layer(h).update.sum().backward()
    # The biggest tensors are the expert tables' gradients (N_experts × D), 1/8 of the limit here.
    assert largest["numel"] <= cfg.num_experts * 16 < limit


def test_peer_usage_stats_sum_to_the_gate_mass():
    cfg = PEERConfig(num_experts=64, num_heads=2, top_k=4, key_dim=8)
    _, records = with_records(cfg.build(D), torch.randn(3, 4, D))
    # softmax gates sum to 1 per head and token: total mass = tokens × heads, each head's 12
    torch.testing.assert_close(records["product_keys"].mass.sum(-1), torch.tensor([12.0, 12.0]))


def test_channel_pruning_keeps_the_strongest_channels_and_their_function():
    """Pruning with keep 1.0 is the identity; with keep < 1 the kept channels' sum equals
    the dense FFN minus the pruned channels' contribution."""
    from finemoe import ModelConfig, Transformer
    from finemoe.convert import prune_dense_ffns

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=D, n_layers=2, n_heads=2, max_seq_len=8, ffn=DenseConfig(20))
    model = randomise(Transformer(cfg)).double()
    sd = model.state_dict()
    same_cfg, same_sd = prune_dense_ffns(sd, cfg, 1.0)
    assert same_cfg.layer_ffns()[0].intermediate_size == 20
    new_cfg, new_sd = prune_dense_ffns(sd, cfg, 0.6)
    assert [f.intermediate_size for f in new_cfg.layer_ffns()] == [12, 12]
    pruned = Transformer(new_cfg).double()
    pruned.load_state_dict(new_sd)
    # one layer by hand: the pruned FFN equals the dense FFN restricted to the kept channels
    dense_ffn, pruned_ffn = model.blocks[0].ffn, pruned.blocks[0].ffn
    h = torch.randn(1, 3, D, dtype=torch.float64)
    w_g, w_u, w_d = (dense_ffn.mlp.gate_proj.weight, dense_ffn.mlp.up_proj.weight, dense_ffn.mlp.down_proj.weight)
    score = w_g.norm(dim=1) * w_u.norm(dim=1) * w_d.norm(dim=0)
    keep = score.topk(12).indices.sort().values
    u = dense_ffn.norm(h)
    expected = (torch.nn.functional.silu(u @ w_g[keep].T) * (u @ w_u[keep].T)) @ w_d[:, keep].T
    torch.testing.assert_close(pruned_ffn(h).update, expected)


# -- Hash layer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    HashConfig(num_experts=5, expert_intermediate_size=12),
    HashConfig(num_experts=4, expert_intermediate_size=10, num_shared_experts=1, shared_expert_intermediate_size=6,
               hash_seed=3),
])
def test_hash_layer_matches_reference(cfg):
    """Outputs and every gradient against the naive float64 reference; the experts a
    token id reaches never change (within a batch, between batches, with the seed fixed)."""
    from tests.helpers import B, T

    torch.manual_seed(0)
    layer = randomise(cfg.build(D)).double()
    ids = torch.randint(0, 50_000, (B, T))
    context = CallContext(token_ids=ids)
    h = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(B, T, D, dtype=torch.float64)
    (layer(h, context=context).update * probe).sum().backward()
    h_ref = h.detach().clone().requires_grad_(True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    (update_ref,) = ref.hash_ffn(h_ref, ids, params, cfg)
    (update_ref * probe).sum().backward()
    torch.testing.assert_close(layer(h, context=context).update, update_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-10, rtol=1e-9)
    for name, p in layer.named_parameters():
        want = params[name].grad if params[name].grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(p.grad, want, atol=1e-10, rtol=1e-9, msg=lambda m: f"gradient of {name}: {m}")


def test_hash_assignment_is_fixed_and_balanced():
    from finemoe.layers.hash import hash_experts

    ids = torch.arange(50_000)
    experts = hash_experts(ids, 16)
    counts = torch.bincount(experts, minlength=16).float()
    assert counts.min() > 0.95 * counts.mean() and counts.max() < 1.05 * counts.mean()
    assert torch.equal(hash_experts(ids.flip(0), 16), experts.flip(0))
    assert not torch.equal(hash_experts(ids, 16, seed=1), experts)


def test_hash_layer_disable_top1_leaves_the_shared_expert_alone():
    from finemoe.layers import intervention

    torch.manual_seed(0)
    layer = randomise(HashConfig(num_experts=4, expert_intermediate_size=10, num_shared_experts=1).build(D))
    h, ids = torch.randn(2, 3, D), torch.randint(0, 1000, (2, 3))
    with intervention(layer, "disable_top1") as reached:
        assert reached == 1
        torch.testing.assert_close(layer(h, context=CallContext(token_ids=ids)).update, layer.shared(layer.norm(h)))
    assert not torch.allclose(layer(h, context=CallContext(token_ids=ids)).update, layer.shared(layer.norm(h)))
    with intervention(HashConfig(num_experts=4, expert_intermediate_size=10).build(D), "disable_top1") as reached:
        assert reached == 0  # without a shared expert nothing would be left


def test_hash_layer_needs_token_ids():
    layer = HashConfig(num_experts=2, expert_intermediate_size=8).build(16)
    with pytest.raises(ValueError, match="routes by token id"):
        layer(torch.randn(1, 2, 16))


# -- top-p routing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    TopPConfig(num_experts=6, expert_intermediate_size=12, threshold=0.5, max_experts_per_tok=3),
    TopPConfig(num_experts=5, expert_intermediate_size=10, threshold=0.9, max_experts_per_tok=5, renormalize=True,
               num_shared_experts=1, shared_expert_intermediate_size=6),
])
def test_top_p_routing_matches_reference(cfg):
    """Outputs, every gradient and both losses against the naive float64 reference."""
    layer = randomise(cfg.build(D))
    out, (lb_ref, dyn_ref) = compare_with_reference(layer, lambda h, p: ref.topp_ffn(h, p, cfg))
    torch.testing.assert_close(out.aux_losses["load_balancing"], cfg.router_aux_loss_coef * lb_ref)
    torch.testing.assert_close(out.aux_losses["dynamic"], cfg.dynamic_loss_coef * dyn_ref)


def test_top_p_takes_more_experts_when_the_router_is_unsure():
    from finemoe.layers.topp import top_p_selection

    confident = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05]])
    unsure = torch.tensor([[0.22, 0.21, 0.2, 0.19, 0.18]])
    assert int(top_p_selection(confident, 0.5, 5)[2].sum()) == 1
    assert int(top_p_selection(unsure, 0.5, 5)[2].sum()) == 3
    assert int(top_p_selection(unsure, 0.5, 2)[2].sum()) == 2  # the cap
    _, idx, kept = top_p_selection(confident, 0.5, 4, skip_top1=True)
    assert 0 not in idx[kept].tolist()  # with the top-1 disabled, the rest takes its place
