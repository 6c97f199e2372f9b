"""Without a GPU, Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` must
be set before any kernel is defined), so CI checks them on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
