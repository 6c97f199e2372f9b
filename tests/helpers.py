"""Shared test helpers: run a layer and its naive reference on the same leaves."""

from __future__ import annotations

import torch

# Awkward sizes: nothing a power of two, tokens not a multiple of anything.
B, T, D = 3, 7, 24


def compare_with_reference(layer, reference_fn, *, atol=1e-10):
    """Run ``layer`` and ``reference_fn(h, params)`` in float64 on the same leaves;
    compare the output, the input gradient and every parameter gradient."""
    torch.manual_seed(1)
    layer = layer.double()
    h = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(B, T, D, dtype=torch.float64)  # a random cotangent

    out = layer(h)
    (out.update * probe).sum().backward()

    h_ref = h.detach().clone().requires_grad_(True)
    params_ref = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    update_ref, *losses_ref = reference_fn(h_ref, params_ref)
    (update_ref * probe).sum().backward()

    torch.testing.assert_close(out.update, update_ref, atol=atol, rtol=1e-9)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=atol, rtol=1e-9)
    for name, p in layer.named_parameters():
        grad_ref = params_ref[name].grad
        if grad_ref is None:
            grad_ref = torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, grad_ref, atol=atol, rtol=1e-9, msg=lambda m: f"gradient of {name}: {m}")
    return out, losses_ref


def randomise(layer):
    """Non-trivial weights everywhere, norms included (init leaves norms at one)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
    return layer


def with_records(layer, h, *, detailed: bool = False, **kwargs):
    """``(layer(h), {record name: record})``: the layer's output and the statistics
    records it added, merged per kind (parts ignored)."""
    from finemoe.layers.records import Stats, merged

    stats = Stats(detailed=detailed)
    out = layer(h, stats=stats, **kwargs)
    return out, {name: record for (_, name), record in merged(stats.records).items()}
