"""Float32 matrix products on tensor cores: the 3xTF32 split.

Router math runs in float32 (METHODS.md preamble). cuBLAS's float32 GEMM runs on the
CUDA cores; its TF32 mode runs on the tensor cores, five times as fast on an H100, but
rounds every input to 10 mantissa bits. Splitting each input into its TF32 part and the
remainder,

    a = a_hi + a_lo,   b = b_hi + b_lo,   a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi,

recovers float32's accuracy: the dropped a_lo·b_lo is 2⁻²² of a·b, and so is the
rounding of a_lo and b_lo to TF32 (CUTLASS's "3xTF32"). The three products run as one
TF32 product over an inner dimension three times as long, [a_hi a_hi a_lo]·[b_hi; b_lo; b_hi].
On an H100 (results/experiments/retrieval_passes/): the product-key query projection,
32,768 × 768 × 1024, X ms against 1.15 for cuBLAS float32, with a largest error against
float64 of X (float32: 1.4e-6; TF32 alone: X).

``float32_mm`` takes it where it runs (a CUDA device of compute capability ≥ 8.0,
float32 inputs, ``FINEMOE_TF32X3`` not ``0``) and ``torch.mm`` otherwise. The product is
an opaque ``torch.library.custom_op``: TF32 is switched on for its one cuBLAS call, which
``torch.compile`` would otherwise lower with the global setting.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["float32_mm", "tf32x3_supported"]

_ENABLED = os.environ.get("FINEMOE_TF32X3", "1") != "0"


def tf32x3_supported(a: Tensor, b: Tensor) -> bool:
    """Whether ``float32_mm`` takes the 3xTF32 path for ``a @ b``."""
    return (_ENABLED and a.is_cuda and a.dtype == torch.float32 and b.dtype == torch.float32
            and torch.cuda.get_device_capability(a.device)[0] >= 8)


def _tf32_part(x: Tensor) -> Tensor:
    """``x`` with the 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


@torch.library.custom_op("finemoe::tf32x3_mm", mutates_args=())
def _tf32x3_mm(a: Tensor, b: Tensor) -> Tensor:
    a_hi, b_hi = _tf32_part(a), _tf32_part(b)
    wide_a = torch.cat([a_hi, a_hi, a - a_hi], dim=1)
    tall_b = torch.cat([b_hi, b - b_hi, b_hi], dim=0)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return wide_a @ tall_b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@_tf32x3_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def float32_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) at float32 accuracy: three TF32 products on the tensor cores where
    ``tf32x3_supported``, ``torch.mm`` otherwise (float64 stays float64)."""
    return _tf32x3_mm(a, b) if tf32x3_supported(a, b) else torch.mm(a, b)
