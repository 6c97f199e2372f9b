"""The language-model loss: the output projection and cross-entropy together, a chunk of
rows at a time, so the float32 logits of the whole batch never exist at once.

The plain form, ``cross_entropy(linear(x, W).float(), targets)``, holds (N, V) logits in
the compute dtype, their float32 copy, the softmax and its gradient: at 32,768 tokens and
a 16,384-token vocabulary that is 2 GiB per float32 copy. Here each chunk of rows computes
its logits, the loss and, while the logits are at hand, their gradient
``(softmax − onehot) / n`` and its two products ``∂x = g W`` and ``∂W += gᵀ x``: the
backward only scales the stored gradients by the incoming scalar. The three matrix
products are those of the plain form's forward and backward; what is saved is the
round trips of (N, V) float32 tensors through memory (Liger's fused linear
cross-entropy makes the same trade).

Numerics follow the plain form under autocast: the products in the compute dtype, the
log-softmax in float32, the weight's gradient accumulated in float32. Targets of
``-100`` are ignored; the loss is the mean over the others.

Shapes: N rows (tokens), D model width, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from finemoe.layers.common import at_least_float32

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference", "chunk_rows_for"]

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 2**26
"""Float32 logits per chunk: 256 MiB (4,096 rows of a 16,384-token vocabulary)."""


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's float32 logits hold ``_CHUNK_ELEMENTS``."""
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def linear_cross_entropy_reference(x_ND: Tensor, weight_VD: Tensor, targets_N: Tensor) -> Tensor:
    """``cross_entropy(x Wᵀ, targets)`` with float32 logits for all N rows at once."""
    logits_NV = F.linear(x_ND, weight_VD)
    return F.cross_entropy(at_least_float32(logits_NV), targets_N, ignore_index=IGNORE_INDEX)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _chunk_loss(logits_CV: Tensor, targets_C: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A chunk's summed loss from its logits (float32 arithmetic), with what the gradient
    needs: the float32 logits, the log-sum-exp per row, and the targets' valid mask."""
    logits_CV32 = at_least_float32(logits_CV)
    valid_C = targets_C != IGNORE_INDEX
    safe_C = torch.where(valid_C, targets_C, torch.zeros_like(targets_C))
    lse_C = torch.logsumexp(logits_CV32, dim=-1)
    target_logit_C = logits_CV32.gather(1, safe_C[:, None]).squeeze(1)
    loss = torch.where(valid_C, lse_C - target_logit_C, torch.zeros_like(lse_C)).sum()
    return loss, logits_CV32, lse_C, valid_C


def _loss_and_logit_grad(logits_CV: Tensor, targets_C: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk's summed loss and ``∂loss/∂logits = (softmax − onehot(target)) / count``
    (zero on ignored rows), in the logits' dtype; the arithmetic in float32."""
    loss, logits_CV32, lse_C, valid_C = _chunk_loss(logits_CV, targets_C)
    onehot_CV = torch.arange(logits_CV.shape[1], device=logits_CV.device)[None, :] == targets_C[:, None]
    grad_CV = (torch.exp(logits_CV32 - lse_C[:, None]) - onehot_CV.to(logits_CV32.dtype)) * (valid_C[:, None] / count)
    return loss, grad_CV.to(logits_CV.dtype)


_compiled_loss_and_logit_grad = None


def _logit_grad_fn(device: torch.device):
    """On a GPU, ``_loss_and_logit_grad`` compiled (one or two fused passes over the chunk's
    logits instead of a dozen eager ones over their float32 copy); eager elsewhere. Inside
    a compiled model, Dynamo inlines it either way."""
    global _compiled_loss_and_logit_grad
    if device.type != "cuda":
        return _loss_and_logit_grad
    if _compiled_loss_and_logit_grad is None:
        _compiled_loss_and_logit_grad = torch.compile(_loss_and_logit_grad, dynamic=False)
    return _compiled_loss_and_logit_grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        x_c, w_c = x_ND.to(dtype), weight_VD.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        count = (targets_N != IGNORE_INDEX).sum().clamp_min(1).to(acc)
        grad_x_ND = torch.empty_like(x_c)
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
        total = torch.zeros((), dtype=acc, device=x_ND.device)
        loss_and_logit_grad = _logit_grad_fn(x_ND.device)
        for start in range(0, x_ND.shape[0], chunk):
            x_CD, targets_C = x_c[start : start + chunk], targets_N[start : start + chunk]
            loss, grad_CV = loss_and_logit_grad(x_CD @ w_c.t(), targets_C, count)
            total = total + loss
            grad_x_ND[start : start + chunk] = grad_CV @ w_c
            grad_w_VD += grad_CV.t() @ x_CD
        ctx.save_for_backward(grad_x_ND, grad_w_VD)
        ctx.dtypes = (x_ND.dtype, weight_VD.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x_ND, grad_w_VD = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x_ND * grad_out).to(x_dtype), (grad_w_VD * grad_out).to(w_dtype), None, None, None


def linear_cross_entropy(x_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, *, chunk_rows: int | None = None) -> Tensor:
    """Mean of ``cross_entropy(x Wᵀ, targets)`` over the targets that are not ``-100``,
    ``chunk_rows`` rows at a time (default: 256 MiB of float32 logits per chunk)."""
    chunk = chunk_rows or chunk_rows_for(weight_VD.shape[0])
    dtype = _compute_dtype(x_ND)
    if torch.is_grad_enabled() and (x_ND.requires_grad or weight_VD.requires_grad):
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            return _LinearCrossEntropy.apply(x_ND, weight_VD, targets_N, chunk, dtype)
    with torch.autocast(device_type=x_ND.device.type, enabled=False):
        x_c, w_c = x_ND.to(dtype), weight_VD.to(dtype)
        total = sum(_chunk_loss(x_c[s : s + chunk] @ w_c.t(), targets_N[s : s + chunk])[0]
                    for s in range(0, x_ND.shape[0], chunk))
        return total / (targets_N != IGNORE_INDEX).sum().clamp_min(1).to(total.dtype)
