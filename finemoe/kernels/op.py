"""How finemoe's Triton kernels become PyTorch operators, in one place.

Each kernel module defines its operators with ``kernel_op`` and launches its kernels
through ``launch(kernel)[grid](...)``. Two registrations are possible:

- ``torch.library.triton_op`` (torch >= 2.6, the default): eager calls run the body as
  a plain function; under ``torch.compile`` Inductor traces the body, sees the Triton
  kernels and launches them from its own generated code. The body is its own fake
  implementation (it only allocates outputs and launches kernels).
- ``torch.library.custom_op`` with an explicit fake implementation (older torch, or
  ``FINEMOE_TRITON_OP=0``): the operator stays opaque to the compiler, and each call
  goes through the dispatcher and Triton's Python launcher. Profiles of the compiled
  routed layers showed 150-300 µs of host time per such call (benchmarks/NOTES.md), the
  reason for the first option.

Both register the same autograd formula (``op.register_autograd``).

A kernel writes only whole tensors that the body allocated, never a view into one (a
slice with an offset): under ``torch.compile`` Inductor copies a written view before the
launch, and torch up to 2.11 sizes that copy by the view's base while reading it from a
buffer sized to the view, past its end (pytorch/pytorch#161115; it crashed compiled
s120m-peer with an illegal memory access, benchmarks/NOTES.md).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

__all__ = ["USES_TRITON_OP", "fake", "kernel_op", "launch"]

USES_TRITON_OP: bool = (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
                        and os.environ.get("FINEMOE_TRITON_OP", "1") != "0"
                        and os.environ.get("TRITON_INTERPRET", "0") != "1")
"""Whether operators are ``triton_op`` s (read once, at import). Not under Triton's CPU
interpreter (the tests of the kernels): its kernels are plain Python functions that
``wrap_triton`` cannot trace, so fake tensors would reach them."""


def kernel_op(name: str, *, mutates_args=()) -> Callable:
    """Decorator: the operator ``name`` (``"finemoe::..."``) whose body allocates its
    outputs and launches Triton kernels with ``launch``."""
    if USES_TRITON_OP:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


def fake(op) -> Callable:
    """Decorator: ``op``'s fake implementation (shapes and dtypes of its outputs), needed
    only by an opaque ``custom_op``; a ``triton_op`` traces its own body instead."""

    def register(fn: Callable) -> Callable:
        if not USES_TRITON_OP:
            op.register_fake(fn)
        return fn

    return register


def launch(kernel):
    """``kernel`` as the operator bodies call it: wrapped for tracing under a
    ``triton_op`` (a no-op wrapper in eager calls), as is otherwise."""
    return torch.library.wrap_triton(kernel) if USES_TRITON_OP else kernel
