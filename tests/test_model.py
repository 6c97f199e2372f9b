"""Model behaviour: causality, per-layer FFN placement, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finemoe import FFNLayers, ModelConfig, Transformer
from finemoe.config import ConfigError
from finemoe.layers import DenseConfig, DenseFFN, MoEConfig, MoEFFN
from finemoe.model import select_layers

MOE = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16)


def _cfg(**kw):
    base = dict(vocab_size=61, d_model=24, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn=DenseConfig(40))
    base.update(kw)
    return ModelConfig(**base)


def test_model_is_causal():
    torch.manual_seed(0)
    model = Transformer(_cfg(ffn_layers=[FFNLayers("1::2", MOE)])).eval()
    ids = torch.randint(0, 61, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_ffn_kinds_are_placed_per_layer():
    model = Transformer(_cfg(ffn_layers=[FFNLayers("1::2", MOE)]))
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, MoEFFN, DenseFFN, MoEFFN]
    model = Transformer(_cfg(ffn=MOE, ffn_layers=[FFNLayers([0, 3], DenseConfig(8))]))
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, MoEFFN, MoEFFN, DenseFFN]
    assert model.blocks[0].ffn.mlp.gate_proj.out_features == 8


@pytest.mark.parametrize(
    "spec,expected",
    [("all", [0, 1, 2, 3, 4, 5]), ("middle", [3]), ("1::2", [1, 3, 5]), ("::2", [0, 2, 4]), ("-1:", [5]), ([4, 2], [2, 4])],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["every", "7:", "1:2:3:4", [6], [1, 1]])
def test_select_layers_rejects(spec):
    with pytest.raises(ConfigError):
        select_layers(spec, 6)


def test_overlapping_ffn_layers_are_rejected():
    with pytest.raises(ConfigError, match=r"ffn_layers\[1\].layers: layer 3"):
        _cfg(ffn_layers=[FFNLayers("1::2", MOE), FFNLayers([3], DenseConfig(8))])


def test_loss_is_cross_entropy_plus_aux_and_ignores_minus_100():
    torch.manual_seed(0)
    model = Transformer(_cfg(ffn_layers=[FFNLayers("1::2", MOE)]))
    ids = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    targets[0, :4] = -100
    out = model(ids, targets)
    assert out.logits is None  # the loss is computed chunk by chunk; the logits of the batch are never formed
    keep = targets != -100
    expected = F.cross_entropy(model(ids).logits[keep], targets[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert set(out.aux_losses) == {"load_balancing", "router_z"}
    torch.testing.assert_close(out.aux_loss, out.aux_losses["load_balancing"] + out.aux_losses["router_z"])


def test_routing_stats_per_layer():
    model = Transformer(_cfg(ffn_layers=[FFNLayers("1::2", MOE)]))
    out = model(torch.randint(0, 61, (2, 10)), return_stats=True)
    assert len(out.layer_stats) == 4
    assert out.layer_stats[0] == []  # a dense layer has no cheap statistics
    ((part, routing),) = out.layer_stats[1]
    assert part == "" and routing.name == "routing"
    assert routing.slot_counts.shape == (4,) and float(routing.slot_counts.sum()) == 20 * MOE.num_experts_per_tok
    assert model(torch.randint(0, 61, (2, 10))).layer_stats is None


def test_tied_embeddings_share_storage():
    model = Transformer(_cfg(tie_embeddings=True))
    assert model.lm_head is None
    untied = Transformer(_cfg(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_sequence_longer_than_max_seq_len_is_an_error():
    model = Transformer(_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_depth_scaled_init_of_output_projections():
    torch.manual_seed(0)
    model = Transformer(_cfg(d_model=256, n_heads=4, ffn=DenseConfig(512), n_layers=8))
    std_in = model.blocks[0].attn.q_proj.weight.std().item()
    std_out = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std_in - 0.02) < 1e-3
    assert abs(std_out - 0.02 / 4) < 5e-4  # 1/sqrt(2·8) = 1/4
