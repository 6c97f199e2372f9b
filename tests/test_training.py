"""Every FFN kind learns: a 2-layer model overfits one fixed batch in 30 steps on CPU."""

from __future__ import annotations

import pytest
import torch

from finemoe import FFN_KINDS, ModelConfig, Transformer
from finemoe.layers import (CartesianConfig, DenseConfig, DSMoEConfig, FinedeepConfig, HashConfig, MoEConfig, PEERConfig,
                            PKMConfig, TopPConfig)

SMALL = {
    "dense": DenseConfig(intermediate_size=96),
    "moe": MoEConfig(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=48),
    "finedeep": FinedeepConfig(num_sublayers=2, experts_per_sublayer=4, expert_intermediate_size=12),
    "dsmoe": DSMoEConfig(intermediate_size=96, num_experts=4),
    "cartesian": CartesianConfig.with_sublayer(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=24),
    "peer": PEERConfig(num_experts=32**2, num_heads=4, top_k=8, key_dim=16),
    "pkm": PKMConfig(num_experts=32**2, num_heads=4, top_k=8, key_dim=16),
    "hash": HashConfig(num_experts=4, expert_intermediate_size=48),
    "topp": TopPConfig(num_experts=4, expert_intermediate_size=24, threshold=0.6, max_experts_per_tok=2),
}


def test_every_kind_is_covered():
    assert set(SMALL) == set(FFN_KINDS)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_two_layer_model_overfits_a_fixed_batch(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=4, max_seq_len=32, ffn=SMALL[kind])
    model = Transformer(cfg)
    tokens = torch.randint(0, 128, (4, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        out = model(inputs, targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[0] > 4.0  # ≈ ln(128) = 4.85 at init
    assert losses[-1] < 0.25 * losses[0], f"{kind}: {losses[0]:.3f} -> {losses[-1]:.3f}"
