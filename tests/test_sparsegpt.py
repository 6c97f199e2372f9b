"""SparseGPT against a naive sequential OBS reference (float64), its patterns, and its
use on a model: fewer reconstruction errors than magnitude pruning, the CLI path."""

import pytest
import torch

from finemoe.config import ConfigError
from finemoe.sparsegpt import parse_pattern, sparsegpt_prune_dense_ffns, sparsegpt_prune_matrix


def _layer(O=6, I=10, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(I, I, generator=g, dtype=torch.float64)
    X = torch.randn(n, I, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    W = torch.randn(O, I, generator=g, dtype=torch.float64)
    return W, X


def _naive_obs(W, H, remove, damp):
    """Column by column: zero the removed weight and give its error to the columns not yet
    visited by the OBS update with the inverse Hessian of those columns, recomputed each time."""
    W = W.clone()
    I = W.shape[1]
    H = H + damp * torch.diag(H).mean() * torch.eye(I, dtype=H.dtype)
    for j in range(I):
        rest = list(range(j, I))
        H_inv = torch.linalg.inv(H[rest][:, rest])
        for r in range(W.shape[0]):
            if remove[r, j]:
                W[r, rest] -= W[r, j] / H_inv[0, 0] * H_inv[0]
                W[r, j] = 0.0
    return W


@pytest.mark.parametrize("block", [3, 4, 128])
def test_fixed_mask_equals_sequential_obs(block):
    W, X = _layer()
    H = X.t() @ X
    remove = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    got = sparsegpt_prune_matrix(W, H, remove_OI=remove, block=block, damp=0.01)
    torch.testing.assert_close(got, _naive_obs(W, H, remove, 0.01))
    assert torch.all(got[remove] == 0)


def test_patterns_and_shares():
    W, X = _layer(O=8, I=16)
    H = X.t() @ X
    two_four = sparsegpt_prune_matrix(W, H, pattern=(2, 4))
    assert torch.all((two_four.view(8, 4, 4) == 0).sum(-1) == 2)  # exactly 2 of every 4 inputs per row
    half = sparsegpt_prune_matrix(W, H, sparsity=0.5, block=8)
    assert torch.count_nonzero(half) == W.numel() // 2
    torch.testing.assert_close(sparsegpt_prune_matrix(W, H, sparsity=0.0), W)  # nothing removed: unchanged
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(None) is None
    with pytest.raises(ConfigError, match="pattern"):
        parse_pattern("4:2")


def test_reconstruction_beats_magnitude_pruning():
    """Inputs whose channels differ in scale, as a language model's activations do: the
    saliency w² / [H⁻¹]_jj² keeps the weights of large inputs, and the OBS update makes up
    for the rest. The update alone, on the magnitude mask, already lowers the error."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    W = torch.randn(16, 32, generator=g, dtype=torch.float64)
    H = X.t() @ X
    err = lambda V: ((X @ (W - V).t()) ** 2).sum()  # noqa: E731
    magnitude_mask = W.abs() < W.abs().flatten().kthvalue(W.numel() // 2 + 1).values
    magnitude = W.masked_fill(magnitude_mask, 0.0)
    pruned = sparsegpt_prune_matrix(W, H, sparsity=0.5)
    assert torch.count_nonzero(magnitude) == torch.count_nonzero(pruned)
    assert err(pruned) < 0.5 * err(magnitude)
    assert err(sparsegpt_prune_matrix(W, H, remove_OI=magnitude_mask)) < err(magnitude)


def test_model_pruning_keeps_shapes_and_the_requested_share():
    from finemoe.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    batches = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    counts = sparsegpt_prune_dense_ffns(model, batches, sparsity=0.5, block=16)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert counts["nonzero_after"] == pytest.approx(counts["ffn_weights"] / 2, rel=0.01)
    assert counts["nonzero_before"] == counts["ffn_weights"]
    with pytest.raises(ConfigError, match="calibration"):
        sparsegpt_prune_dense_ffns(model, [], sparsity=0.5)


def test_block_by_block_calibration_equals_full_forward_passes():
    """The recorded block inputs give the Hessians that full forward passes of the
    partly pruned model give (the naive way: one pass per projection)."""
    import copy

    from finemoe.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16)).double()
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    naive = copy.deepcopy(model)
    sparsegpt_prune_dense_ffns(model, batches, sparsity=0.5, block=16)

    def hessian(module, width):  # Σ xᵀx of module's input, over every calibration token
        H = torch.zeros(width, width, dtype=torch.float64)

        def add(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            H.add_(x.t() @ x)  # returns nothing: the layer's input is left as it is

        handle = module.register_forward_pre_hook(add)
        with torch.no_grad():
            for b in batches:
                naive(b)
        handle.remove()
        return H

    with torch.no_grad():
        for block in naive.blocks:
            mlp = block.ffn.mlp
            H_x = hessian(mlp, mlp.gate_proj.in_features)  # gate and up read the MLP's input
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.weight.copy_(sparsegpt_prune_matrix(linear.weight, H_x, sparsity=0.5, block=16))
            H_h = hessian(mlp.down_proj, mlp.down_proj.in_features)
            mlp.down_proj.weight.copy_(sparsegpt_prune_matrix(mlp.down_proj.weight, H_h, sparsity=0.5, block=16))
    for (name, got), expected in zip(model.state_dict().items(), naive.state_dict().values()):
        torch.testing.assert_close(got, expected, msg=name)
