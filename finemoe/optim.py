"""``RowSparseAdamW``: AdamW whose row tables are updated only in the rows a step touched.

A PEER or PKM layer reads its expert tables (up to 1024² rows) through an index; each
step's gradient is zero in every row no token retrieved, but dense AdamW still reads and
writes the whole table and its two moments (7 passes over it). Parameter groups marked
``row_sparse=True`` are updated lazily instead, as Lample et al.'s product-key memories
were (with sparse gradients and ``torch.optim.SparseAdam``):

- a row is *touched* when its gradient is non-zero somewhere; only touched rows change;
- on a touched row the update is AdamW's, with the bias corrections of the optimizer's
  own step count t (the steps on which the table had a gradient), as ``SparseAdam`` and
  TensorFlow's ``LazyAdam`` count them;
- an untouched row keeps its parameter and both moments: no weight decay, no decay of the
  moments, no step along its old momentum (dense AdamW would do all three).

So a row touched at every step follows AdamW exactly; on the first step (zero moments)
every touched row equals AdamW's, and with weight decay 0 every untouched row does too
(AdamW moves it by 0). A row first touched at step t ≫ 1 takes a smaller first step than
a fresh AdamW would (its moments start at zero, its bias correction is that of step t).
A row retrieved but given an exactly zero gradient (e.g. a ReLU expert that never fired)
counts as untouched.

The gradients stay dense tensors (``torch.compile`` cannot yet produce sparse
gradients): the saving is the optimizer's, 1 + 6·(share touched) passes over the table
instead of 7. Other groups are plain ``torch.optim.AdamW`` (fused where asked).

Gradient clipping (``RowSparseAdamW.clip_grad_norm_``) is
``torch.nn.utils.clip_grad_norm_``'s, except that the tables' gradients are multiplied
by the clipping factor inside the next update rather than by a pass of their own (two
more passes over gigabytes of mostly zero rows: 1.2 ms a step in s120m-peer), and that
the pass computing the tables' norms also flags their touched rows, so that the update
reads only those rows' gradients (one pass over a table's gradient a step, not two).
"""

from __future__ import annotations

import torch

from finemoe.kernels.row_sparse_adamw import row_sparse_adamw_, row_squares

__all__ = ["RowSparseAdamW"]


class RowSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, except that parameter groups with ``row_sparse=True`` (tables
    of rows, ``ndim >= 2``) are updated lazily: see the module docstring. Their state has
    AdamW's keys (``step`` on the host, ``exp_avg``, ``exp_avg_sq``)."""

    def add_param_group(self, param_group: dict) -> None:
        row_sparse = bool(param_group.get("row_sparse", False))
        if row_sparse:
            # step counts stay on the host (their bias corrections are computed there)
            param_group = {**param_group, "fused": False, "foreach": False, "capturable": False}
        super().add_param_group({**param_group, "row_sparse": row_sparse})
        if row_sparse:
            self._check_row_group(self.param_groups[-1])

    @staticmethod
    def _check_row_group(group: dict) -> None:
        for option in ("amsgrad", "maximize", "differentiable"):
            if group.get(option):
                raise ValueError(f"RowSparseAdamW: a row_sparse group does not support {option}=True")
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(f"RowSparseAdamW: row_sparse parameters must be tables (ndim >= 2), got shape "
                                 f"{tuple(p.shape)}")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every parameter's gradient: the total
        2-norm, returned, and every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``
        — the row tables' in the next ``step``. The tables' norms come from one pass over
        their gradients that also flags their touched rows, which ``step`` then reads
        instead of the gradients. On torch < 2.6 (no ``get_total_norm``), torch's own
        function."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not hasattr(torch.nn.utils, "get_total_norm"):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        table_ids = {id(p) for g in self.param_groups if g["row_sparse"] for p in g["params"]}
        tables = [p for p in params if id(p) in table_ids]
        dense = [p for p in params if id(p) not in table_ids]
        norms = [torch.nn.utils.get_total_norm([p.grad for p in dense])] if dense else []
        touched = {}
        for p in tables:
            squares, touched[p] = row_squares(p.grad)
            norms.append(squares.sum().sqrt())
        if not norms:
            return torch.zeros(())
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0]) for n in norms]))  # as get_total_norm combines
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if dense:
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, norm)
        self._clipped = (factor, touched) if tables else None
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clipped = None  # the clipping factor and touched rows belong to the gradients they came from
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lazy = [g for g in self.param_groups if g["row_sparse"]]
        # the row tables' clipping factor and touched rows, from clip_grad_norm_ since zero_grad
        grad_scale, touched = getattr(self, "_clipped", None) or (None, {})
        self._clipped = None
        held = []  # the row tables' gradients, hidden from AdamW's own step below
        for group in lazy:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("RowSparseAdamW takes dense gradients (zero in untouched rows)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                row_sparse_adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1,
                                  beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                  step=int(state["step"]), grad_scale=grad_scale, touched=touched.get(p))
                held.append((p, p.grad))
                p.grad = None
        try:
            _without_hooks(torch.optim.AdamW.step)(self)
        finally:
            for p, grad in held:
                p.grad = grad
        return loss


def _without_hooks(step):
    """``step`` without the wrapper ``torch.optim`` puts on the ``step`` of every optimizer
    class it instantiates (it runs the step hooks, which ``RowSparseAdamW.step``'s own
    wrapper has already run for this step)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step
