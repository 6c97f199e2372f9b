"""Row-sparse AdamW against fused AdamW on PEER's expert tables (issue 12, item 2).

In one process:
1. the PEER layer at the issue's size (N = 1024² experts, d = 1024, h = 8, k = 16,
   16,384 tokens, bf16 autocast): one forward + backward gives the tables' real
   gradients; the share of rows they touch; the optimizer step over the layer's
   parameters with ``torch.optim.AdamW(fused=True)`` and with ``RowSparseAdamW`` (tables
   lazy, the rest fused AdamW); and forward + backward + step for each.
2. one 1024² × 1024 float32 table with a synthetic share of touched rows: the step time
   of both optimizers, and the bytes each moves (AdamW 7 passes; lazy 1 + 6·share).

    python benchmarks/experiments/row_sparse_adamw.py --out results/experiments/row_sparse_adamw/h100
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finemoe.environment import git_commit  # noqa: E402
from finemoe.kernels.row_sparse_adamw import touched_rows  # noqa: E402
from finemoe.layers import PEERConfig  # noqa: E402
from finemoe.optim import RowSparseAdamW  # noqa: E402
from layer_benchmark import median_ms as shared_median_ms  # noqa: E402

ROWS, D = 1024**2, 1024


def optimizers(params, tables):
    """(name, optimizer): fused AdamW over everything, then lazy tables + fused AdamW for
    the rest (one at a time: each holds two moments of the tables)."""
    rest = [p for p in params if not any(p is t for t in tables)]
    yield "AdamW (fused)", torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    groups = ([{"params": rest}] if rest else []) + [{"params": tables, "row_sparse": True}]
    yield "RowSparseAdamW", RowSparseAdamW(groups, lr=1e-3, weight_decay=0.1, fused=True)


median_ms = partial(shared_median_ms, warmup=2, repeats=10)


def layer_rows(tokens: int) -> list[dict]:
    torch.manual_seed(0)
    layer = PEERConfig(num_experts=ROWS, num_heads=8, top_k=16, key_dim=256).build(D).cuda()
    h = torch.randn(1, tokens, D, device="cuda")
    probe = torch.randn(1, tokens, D, device="cuda")

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(h).update
        (out.float() * probe).sum().backward()

    forward_backward()
    share = float(touched_rows(layer.expert_in.grad).float().mean())
    grads = {p: p.grad.clone() for p in layer.parameters()}
    fwd_bwd_ms = median_ms(lambda: (layer.zero_grad(set_to_none=True), forward_backward()))
    rows = []
    for name, optimizer in optimizers(list(layer.parameters()), list(layer.row_tables())):
        def step():
            for p, g in grads.items():
                p.grad = g
            optimizer.step()

        def train_step():
            layer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()

        rows.append(dict(size=f"PEER layer, {tokens:,} tokens", optimizer=name, touched_share=share,
                         step_ms=median_ms(step), fwd_bwd_ms=fwd_bwd_ms, fwd_bwd_step_ms=median_ms(train_step)))
        del optimizer
        torch.cuda.empty_cache()
    del layer, grads
    torch.cuda.empty_cache()
    return rows


def table_rows(shares) -> list[dict]:
    table = torch.nn.Parameter(torch.randn(ROWS, D, device="cuda"))
    rows = []
    for share in shares:
        grad = torch.randn(ROWS, D, device="cuda")
        grad[torch.rand(ROWS, device="cuda") >= share] = 0.0
        for name, optimizer in optimizers([table], [table]):
            def step():
                table.grad = grad
                optimizer.step()

            passes = 7 if name.startswith("AdamW") else 1 + 6 * share
            ms = median_ms(step)
            rows.append(dict(size="one 1024² × 1024 table", optimizer=name, touched_share=share, step_ms=ms,
                             tb_per_s=passes * ROWS * D * 4 / ms / 1e9))
            del optimizer
            torch.cuda.empty_cache()
    return rows


def markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# Row-sparse AdamW against fused AdamW, {header['hardware']}", "",
             f"Commit `{header['commit']}`; command `{header['command']}`.", "",
             "| tables | optimizer | rows touched | step ms | fwd+bwd ms | fwd+bwd+step ms | TB/s (bytes moved / time) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = lambda key, fmt: format(r[key], fmt) if key in r else ""  # noqa: E731
        lines.append(f"| {r['size']} | {r['optimizer']} | {r['touched_share']:.1%} | {r['step_ms']:.2f} | "
                     f"{cell('fwd_bwd_ms', '.2f')} | {cell('fwd_bwd_step_ms', '.2f')} | {cell('tb_per_s', '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 2048])
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.01])
    args = parser.parse_args()
    header = dict(hardware=f"{torch.cuda.get_device_name()} (torch {torch.__version__})", commit=git_commit(),
                  command="python " + " ".join(sys.argv))
    rows = [r for tokens in args.tokens for r in layer_rows(tokens)] + table_rows(args.shares)
    text = markdown(header, rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(header | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
