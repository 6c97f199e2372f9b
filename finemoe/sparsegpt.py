"""SparseGPT: one-shot pruning of the dense FFNs' weights with calibration data
(Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), DSMoE's third baseline (METHODS.md §2).

For a linear layer ``y = x Wᵀ`` (W: out × in) and calibration inputs X (n × in), pruning
minimises the layer's output error ``‖X Wᵀ − X Ŵᵀ‖²`` whose Hessian in each row of W is
``H = 2 XᵀX`` (the same for every row). Columns are visited left to right in blocks of
B; within a block, the weights to remove are chosen by the OBS saliency
``w² / [H⁻¹]_jj²`` (eq. 3 of the paper: unstructured, a share of each block; or n of
every m consecutive inputs per row, the semi-structured n:m pattern such as 2:4), and
after zeroing column j the error ``(w_j − ŵ_j) / [H⁻¹]_jj`` is spread over the columns
not yet visited through row j of the upper Cholesky factor of H⁻¹ (the paper's
Algorithm 1: one Cholesky factorisation serves every row). ``damp`` (1% of the mean
diagonal) keeps H invertible.

The model is pruned block by block, in order: each FFN's gate and up projections from
the inputs the already-pruned model gives them, then its down projection from the
hidden units of the pruned gate and up (the paper's sequential scheme). Weights are
zeroed in place: the model keeps its shapes, and its nonzero weights are its
activated parameters.

Shapes: O output rows, I inputs, n calibration rows, B columns per block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.config import ConfigError

__all__ = ["sparsegpt_prune_matrix", "sparsegpt_prune_dense_ffns", "parse_pattern"]


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``: n weights of every m consecutive inputs are removed."""
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ConfigError("pattern", f"expected n:m such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ConfigError("pattern", f"n:m needs 0 < n < m, got {pattern!r}")
    return n, m


@torch.no_grad()
def sparsegpt_prune_matrix(weight_OI: Tensor, hessian_II: Tensor, *, sparsity: float = 0.5,
                           pattern: tuple[int, int] | None = None, block: int = 128, damp: float = 0.01,
                           remove_OI: Tensor | None = None) -> Tensor:
    """The pruned and corrected weight (same shape; float64 for float64 input, else
    float32): ``sparsity`` of each block's weights removed (unstructured), or ``pattern``
    (n, m): n of every m inputs per row, or exactly the weights where ``remove_OI`` is
    true (a fixed mask). ``hessian_II`` = XᵀX (any positive scale) of the layer's
    calibration inputs."""
    dtype = torch.float64 if weight_OI.dtype == torch.float64 else torch.float32
    W = weight_OI.detach().to(dtype).clone()
    O, I = W.shape
    H = hessian_II.detach().to(dtype).clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter, remove them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(I, device=H.device, dtype=dtype)
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(H_inv, upper=True)  # row j: how the error of column j spreads to later ones
    for start in range(0, I, block):
        end = min(start + block, I)
        W_b, U_b = W[:, start:end].clone(), U[start:end, start:end]
        errors = torch.zeros_like(W_b)
        if remove_OI is not None:
            remove = remove_OI[:, start:end].to(W.device).clone()
        elif pattern is None:  # remove the `sparsity` share of this block with the lowest saliency
            saliency = W_b**2 / torch.diag(U_b)[None, :] ** 2
            k = int(saliency.numel() * sparsity)
            remove = torch.zeros_like(W_b, dtype=torch.bool)
            if k > 0:
                remove.view(-1)[saliency.flatten().topk(k, largest=False).indices] = True
        else:
            remove = torch.zeros_like(W_b, dtype=torch.bool)
        for j in range(end - start):
            if remove_OI is None and pattern is not None and j % pattern[1] == 0:  # choose this group of m columns' n removals per row
                n, m = pattern
                group = W_b[:, j : j + m] ** 2 / torch.diag(U_b)[j : j + m][None, :] ** 2
                remove.scatter_(1, j + group.topk(n, dim=1, largest=False).indices, True)
            w = W_b[:, j]
            q = torch.where(remove[:, j], torch.zeros_like(w), w)
            error = (w - q) / U_b[j, j]
            W_b[:, j:] -= error[:, None] * U_b[j, j:][None, :]
            W_b[:, j] = q
            errors[:, j] = error
        W[:, start:end] = W_b
        W[:, end:] -= errors @ U[start:end, end:]
    return W


class _StopForward(Exception):
    """Raised by a hook once the inputs it waits for are recorded: the rest of the
    forward pass is not needed."""


def _stop_at(module: torch.nn.Module, record):
    """A pre-hook on ``module`` that hands its inputs to ``record``, then stops the pass."""
    def hook(mod, args, kwargs):
        record(args, kwargs)
        raise _StopForward
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _run_until_stopped(fn) -> None:
    try:
        fn()
    except _StopForward:
        pass


@torch.no_grad()
def _input_hessian(block: torch.nn.Module, module: torch.nn.Module, weight: Tensor, block_inputs: list) -> Tensor:
    """``Σ xᵀx`` over every calibration token of ``module``'s input, the input of the
    products with ``weight`` (accumulated in float64, returned in float32 or the weight's
    float64), running ``block`` on its recorded inputs up to ``module``."""
    H = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)

    def record(args, kwargs):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        H.add_(x.t() @ x)

    handle = _stop_at(module, record)
    try:
        for args, kwargs in block_inputs:
            _run_until_stopped(lambda: block(*args, **kwargs))
    finally:
        handle.remove()
    return H.to(torch.promote_types(weight.dtype, torch.float32))


@torch.no_grad()
def sparsegpt_prune_dense_ffns(model, batches, *, sparsity: float = 0.5, pattern: tuple[int, int] | None = None,
                               block: int = 128, damp: float = 0.01) -> dict[str, float]:
    """Prune every dense FFN's three projections of ``model`` in place, transformer block
    by block (``batches``: token ids ``(B, T)``). Each block's inputs are recorded once and
    its pruned outputs become the next block's inputs, so calibration costs about three
    forward passes whatever the depth. Returns the FFN weights' counts: total and nonzero
    before and after."""
    if pattern is None and not 0 <= sparsity < 1:
        raise ConfigError("sparsity", f"must be in [0, 1), got {sparsity}")
    device = next(model.parameters()).device
    batches = [torch.as_tensor(b, device=device) for b in batches]
    if not batches:
        raise ConfigError("calibration", "SparseGPT needs calibration data (no batch was given)")
    ffns = [block_.ffn.mlp for block_ in model.blocks if block_.ffn.config.is_plain_swiglu]
    if not ffns:
        raise ConfigError("model.ffn", "the model has no dense FFN to prune")
    weights = [lin.weight for mlp in ffns for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    counts = {"ffn_weights": float(sum(w.numel() for w in weights)),
              "nonzero_before": float(sum(int(torch.count_nonzero(w)) for w in weights))}
    was_training = model.training
    model.eval()
    try:
        inputs: list = []  # (args, kwargs) of the current block, one per calibration batch
        handle = _stop_at(model.blocks[0], lambda args, kwargs: inputs.append((args, kwargs)))
        try:
            for batch in batches:
                _run_until_stopped(lambda: model(batch))
        finally:
            handle.remove()
        for block_ in model.blocks:
            if block_.ffn.config.is_plain_swiglu:
                mlp = block_.ffn.mlp
                # gate and up read the MLP's input (one product against both weights)
                H_x = _input_hessian(block_, mlp, mlp.gate_proj.weight, inputs)
                for linear in (mlp.gate_proj, mlp.up_proj):
                    linear.weight.copy_(sparsegpt_prune_matrix(linear.weight, H_x, sparsity=sparsity, pattern=pattern,
                                                               block=block, damp=damp))
                # the hidden units of the pruned gate and up
                H_h = _input_hessian(block_, mlp.down_proj, mlp.down_proj.weight, inputs)
                mlp.down_proj.weight.copy_(sparsegpt_prune_matrix(mlp.down_proj.weight, H_h, sparsity=sparsity,
                                                                  pattern=pattern, block=block, damp=damp))
            # the next block reads this one's output (a block returns (x, ffn output))
            inputs = [((block_(*args, **kwargs)[0],) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    finally:
        model.train(was_training)
    counts["nonzero_after"] = float(sum(int(torch.count_nonzero(w)) for w in weights))
    return counts
