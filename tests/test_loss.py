"""The chunked linear cross-entropy against the plain form (float64 on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from finemoe.loss import linear_cross_entropy, linear_cross_entropy_reference


def _inputs(N=10, D=6, V=13, ignore=(1, 7), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignore)] = -100
    return x, w, targets


def _naive(x, w, targets):
    """Per row: log-sum-exp minus the target's logit, averaged over the kept rows."""
    losses = [torch.logsumexp(x[n] @ w.t(), 0) - x[n] @ w[t] for n, t in enumerate(targets.tolist()) if t != -100]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 10, 64])
def test_value_and_gradients_equal_the_plain_form(chunk_rows):
    x, w, targets = _inputs()
    loss = linear_cross_entropy(x, w, targets, chunk_rows=chunk_rows)
    (loss * 2.5).backward()  # the backward scales by the incoming gradient
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = _naive(x, w, targets)
    (expected * 2.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)
    torch.testing.assert_close(linear_cross_entropy_reference(x, w, targets), expected)


def test_without_gradients_and_all_targets_ignored():
    x, w, targets = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, targets, chunk_rows=3), _naive(x, w, targets))
    ignored = torch.full_like(targets, -100)
    loss = linear_cross_entropy(x, w, ignored, chunk_rows=3)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_bf16_autocast_matches_the_plain_form_under_autocast():
    x, w, targets = _inputs(N=64, D=32, V=50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, chunk_rows=16)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100)
    expected.backward()
    assert grads[0].dtype == x.dtype and grads[1].dtype == w.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0], x.grad, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(grads[1], w.grad, rtol=5e-2, atol=2e-3)


def test_compiles_with_fullgraph():
    x, w, targets = _inputs(dtype=torch.float32)
    compiled = torch.compile(lambda a, b, t: linear_cross_entropy(a, b, t, chunk_rows=4), fullgraph=True)
    loss = compiled(x, w, targets)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = _naive(x.double(), w.double(), targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-4, atol=1e-5)
