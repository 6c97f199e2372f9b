"""``RowSparseAdamW`` (``train.row_sparse_updates``) against ``torch.optim.AdamW`` and a
per-row loop written here; the trainer's use of it on a PEER model."""

from __future__ import annotations

import pytest
import torch

from finemoe.checkpoint import CheckpointError
from finemoe.config import ConfigError
from finemoe.kernels.row_sparse_adamw import touched_rows
from finemoe.optim import RowSparseAdamW
from finemoe.train import Trainer

from tests.test_train import _config, shards  # noqa: F401  (the module's data fixture)

LR, BETAS, EPS = 0.05, (0.9, 0.95), 1e-8


def _gradient(rows, width, untouched, seed):
    g = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g[list(untouched)] = 0.0
    return g


def _lazy_adamw_loop(table, grads, weight_decay):
    """Lazy AdamW written row by row: a row with a zero gradient is skipped entirely."""
    table = table.clone()
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    for t, g in enumerate(grads, start=1):
        for r in range(table.shape[0]):
            if not g[r].any():
                continue
            table[r] *= 1 - LR * weight_decay
            m[r] = BETAS[0] * m[r] + (1 - BETAS[0]) * g[r]
            v[r] = BETAS[1] * v[r] + (1 - BETAS[1]) * g[r] ** 2
            m_hat, v_hat = m[r] / (1 - BETAS[0] ** t), v[r] / (1 - BETAS[1] ** t)
            table[r] -= LR * m_hat / (v_hat.sqrt() + EPS)
    return table, m, v


def test_first_step_equals_adamw_on_touched_rows_and_leaves_the_others():
    """Weight decay 0, zero moments: AdamW moves an untouched row by 0, so the two agree
    on every row; untouched rows keep zero moments."""
    start = torch.randn(9, 5, dtype=torch.float64)
    grad = _gradient(9, 5, untouched=(2, 6), seed=1)
    lazy, dense = (torch.nn.Parameter(start.clone()) for _ in range(2))
    opt = RowSparseAdamW([{"params": [lazy], "row_sparse": True}], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    ref = torch.optim.AdamW([dense], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    lazy.grad, dense.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(lazy.detach()[[2, 6]], start[[2, 6]])
    torch.testing.assert_close(opt.state[lazy]["exp_avg"], ref.state[dense]["exp_avg"])
    assert not opt.state[lazy]["exp_avg_sq"][[2, 6]].any()


def test_lazy_steps_follow_the_per_row_loop_with_weight_decay():
    start = torch.randn(8, 3, dtype=torch.float64)
    grads = [_gradient(8, 3, untouched, seed) for seed, untouched in enumerate([(0, 5), (1, 2, 5), (5,), (5, 7)])]
    table = torch.nn.Parameter(start.clone())
    opt = RowSparseAdamW([{"params": [table], "row_sparse": True}], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    for g in grads:
        table.grad = g.clone()
        opt.step()
    want, m, v = _lazy_adamw_loop(start, grads, weight_decay=0.1)
    torch.testing.assert_close(table.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[table]["exp_avg"], m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[table]["exp_avg_sq"], v, rtol=1e-12, atol=1e-12)
    assert torch.equal(table.detach()[5], start[5])  # never touched: never decayed
    # Dense AdamW would have decayed row 5 and moved the rows skipped on some step.
    dense = torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([dense], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    for g in grads:
        dense.grad = g.clone()
        ref.step()
    assert not torch.allclose(dense.detach()[5], start[5])


def test_rows_touched_every_step_and_the_other_groups_follow_adamw_exactly():
    torch.manual_seed(0)
    start = [torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    lazy = [torch.nn.Parameter(t.clone()) for t in start]
    dense = [torch.nn.Parameter(t.clone()) for t in start]
    opt = RowSparseAdamW([{"params": [lazy[0]], "row_sparse": True}, {"params": [lazy[1]], "weight_decay": 0.0}],
                         lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": [dense[0]]}, {"params": [dense[1]], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    hook_calls = []
    opt.register_step_pre_hook(lambda *args: hook_calls.append(1))
    for seed in range(4):
        grads = [torch.randn(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) for t in start]
        for params, optimizer in ((lazy, opt), (dense, ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        assert lazy[0].grad is not None  # the step hides the tables' gradients only while AdamW runs
    for a, b in zip(lazy, dense):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    assert len(hook_calls) == 4  # once per step, though AdamW's own step runs inside


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping and not
def test_clipping_inside_the_update_equals_torch_clipping_then_the_step(max_norm):
    """``clip_grad_norm_`` scales the tables' gradients inside the next update instead of
    in place: the norm it returns and every parameter after the step equal
    ``torch.nn.utils.clip_grad_norm_`` followed by the step, over several steps."""
    if not hasattr(torch.nn.utils, "get_total_norm"):
        pytest.skip("torch < 2.6 clips with torch's own function")
    torch.manual_seed(0)
    start = [torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]
    runs = []
    for folded in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = RowSparseAdamW([{"params": [params[0]], "row_sparse": True}, {"params": [params[1]]}],
                             lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
        norms = []
        for seed, untouched in enumerate([(1, 3), (0,), (2, 3, 5)]):
            params[0].grad = _gradient(6, 4, untouched, seed)
            params[1].grad = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + seed))
            if folded:
                norms.append(opt.clip_grad_norm_(max_norm))
                assert torch.equal(params[0].grad, _gradient(6, 4, untouched, seed))  # not scaled in place
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            opt.step()
            opt.zero_grad()
        runs.append((params, norms))
    (got, got_norms), (want, want_norms) = runs
    torch.testing.assert_close(torch.stack(got_norms), torch.stack(want_norms), rtol=1e-12, atol=0)
    assert got_norms[0] > max_norm or max_norm > 1e3  # the small bound does clip
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_the_same_updates():
    start = torch.randn(7, 3)
    grads = [_gradient(7, 3, untouched, seed).float() for seed, untouched in enumerate([(1,), (1, 4), (0,), ()])]

    def run(split: bool):
        table = torch.nn.Parameter(start.clone())
        make = lambda: RowSparseAdamW([{"params": [table], "row_sparse": True}], lr=LR, weight_decay=0.1)  # noqa: E731
        opt = make()
        for i, g in enumerate(grads):
            if split and i == 2:
                saved = opt.state_dict()
                opt = make()
                opt.load_state_dict(saved)
            table.grad = g.clone()
            opt.step()
        return table.detach()

    assert torch.equal(run(split=False), run(split=True))


def test_bad_row_sparse_groups_are_refused():
    with pytest.raises(ValueError, match="tables"):
        RowSparseAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "row_sparse": True}])
    with pytest.raises(ValueError, match="amsgrad"):
        RowSparseAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 2))], "row_sparse": True}], amsgrad=True)


def _table_rows_changed_and_touched(trainer, steps):
    """For each step: the rows of the first row table that changed, and those with a gradient."""
    table = trainer.model.row_tables()[0]
    touched = {}
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: touched.update(rows=touched_rows(table.grad)))
    out = []
    for _ in range(steps):
        before = table.detach().clone()
        trainer.train_step()
        out.append(((table.detach() != before).any(dim=1), touched["rows"].clone()))
    return out


def test_trainer_updates_only_the_retrieved_rows_of_peer_tables(shards, tmp_path):  # noqa: F811
    lazy = Trainer(_config(shards, tmp_path / "lazy", "train.row_sparse_updates=true", preset="tiny-peer"),
                   progress=False)
    assert isinstance(lazy.optimizer, RowSparseAdamW) and len(lazy.model.row_tables()) == 2
    for changed, touched in _table_rows_changed_and_touched(lazy, steps=3):
        assert 0 < int(touched.sum()) < touched.numel()  # some rows retrieved, not all
        assert torch.equal(changed, touched)
    dense = Trainer(_config(shards, tmp_path / "dense", preset="tiny-peer"), progress=False)
    changed, touched = _table_rows_changed_and_touched(dense, steps=2)[-1]
    assert changed.all() and not touched.all()  # AdamW moves every row (decay, momentum)


def test_trainer_row_sparse_updates_need_row_tables_and_the_same_setting_on_resume(shards, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="row_sparse_updates"):
        Trainer(_config(shards, tmp_path / "dense", "train.row_sparse_updates=true"), progress=False)
    Trainer(_config(shards, tmp_path / "peer", "train.steps=4", preset="tiny-peer"), progress=False).fit()
    with pytest.raises(CheckpointError, match="row_sparse_updates=false"):
        Trainer(_config(shards, tmp_path / "peer", "train.steps=8", "train.row_sparse_updates=true",
                        preset="tiny-peer"), resume=True, progress=False)
