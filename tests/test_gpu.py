"""CUDA checks: every kind runs forward and backward on the GPU under bf16 autocast and
agrees with its float32 CPU result. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_training import SMALL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_bf16_autocast_on_cuda_matches_float32_cpu(kind):
    torch.manual_seed(0)
    cpu_layer = SMALL[kind].build(48).eval()  # eval: BatchNorm uses fixed running stats on both sides
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    h = torch.randn(4, 64, 48)
    ref = cpu_layer(h).update
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_layer(h.cuda())
    assert out.update.dtype in (torch.bfloat16, torch.float32)
    # Routing decisions may flip for near-ties under bf16, so compare in norm, loosely.
    assert _rel(out.update.cpu(), ref) < 5e-2, kind
    for loss in out.aux_losses.values():
        assert loss.dtype == torch.float32  # router math stays in float32

    gpu_layer.train()
    h_gpu = h.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_layer(h_gpu)
    (out.update.float().sum() + sum(out.aux_losses.values(), torch.zeros((), device="cuda"))).backward()
    assert torch.isfinite(h_gpu.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in gpu_layer.parameters() if p.grad is not None)
