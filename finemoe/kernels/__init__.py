"""Fast paths, kept apart from the layers (ScatterMoE's structure): a kernel or library
call → a launcher → an operator (``finemoe.kernels.op``: a ``torch.library.triton_op``
that ``torch.compile`` traces into and launches itself, or on older torch a ``custom_op``
with a fake implementation, one opaque op; ``fullgraph=True`` either way) → autograd →
used by a layer, which keeps its plain PyTorch path as the readable reference."""

from finemoe.kernels.grouped_mm import grouped_mm, native_grouped_mm_supported
from finemoe.kernels.swiglu import fused_swiglu, triton_kernels_available

__all__ = ["fused_swiglu", "triton_kernels_available", "grouped_mm", "native_grouped_mm_supported"]
