"""Parity with the ecosystem: Hugging Face LLaMA and Mixtral, converted with the real converter."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from finemoe.convert import (  # noqa: E402
    from_hf,
    mixtral_experts_from_hf,
    model_config_from_hf,
    state_dict_from_hf,
    state_dict_to_hf_llama,
)
from finemoe.layers import MoEConfig  # noqa: E402
from finemoe.model import Transformer  # noqa: E402


def _llama(tie: bool, n_kv_heads: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_theta=5000.0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to one; random norms test the mapping properly
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return model


@pytest.mark.parametrize("tie,n_kv_heads", [(False, 2), (True, 6), (False, 1)])
def test_llama_logits_match(tie, n_kv_heads):
    hf = _llama(tie, n_kv_heads)
    ours = from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_llama_loss_matches_hf_shifted_loss():
    hf = _llama(False)
    ours = from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss  # HF shifts labels internally
        got = ours(ids[:, :-1], ids[:, 1:]).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llama_export_round_trip():
    hf = _llama(False)
    ours = from_hf(hf)
    exported = state_dict_to_hf_llama(ours.state_dict(), ours.config)
    reference = hf.state_dict()
    assert set(exported) == set(k for k in reference if "rotary" not in k)
    for key, value in exported.items():
        torch.testing.assert_close(value, reference[key])


def _mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF leaves some expert weights at init values; make all random
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


def test_moe_layer_matches_mixtral_sparse_moe_block():
    hf = _mixtral()
    layer_hf = hf.model.layers[0]
    moe_block = getattr(layer_hf, "mlp", None) or layer_hf.block_sparse_moe
    cfg = model_config_from_hf(hf.config).ffn
    assert isinstance(cfg, MoEConfig)
    ours = cfg.build(40).eval()
    prefix = "mlp." if hasattr(layer_hf, "mlp") else "block_sparse_moe."
    weights = mixtral_experts_from_hf(moe_block.state_dict(prefix=prefix), prefix, cfg.num_experts)
    weights["norm.weight"] = layer_hf.post_attention_layernorm.weight
    ours.load_state_dict(weights, strict=True)

    h = torch.randn(3, 11, 40)
    with torch.no_grad():
        expected = moe_block(layer_hf.post_attention_layernorm(h))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours(h).update
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mixtral_logits_match():
    hf = _mixtral()
    ours = from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=5e-5, rtol=1e-4)


def test_state_dict_from_config_json_dict():
    """The converter also takes a config.json dict, as read from a checkpoint on disk."""
    hf = _llama(True)
    cfg = model_config_from_hf(hf.config.to_dict())
    model = Transformer(cfg)
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=True)
