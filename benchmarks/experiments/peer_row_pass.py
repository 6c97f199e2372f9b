"""Experiment: PEER's per-row gradient pass on the retrievals of a real s120m-peer step.

The profile of s120m-peer at seq 1024, batch 32 (eb7599d) puts the row-gradient pass at
15.5 ms a step, the largest item of the PEER layer, against a byte floor of ~4.3 ms (4.2M
(token, slot) pairs reading a bf16 row of x and of dy, 768 wide). One program per pool
row walks that row's pairs one at a time: each pair is a chain of dependent loads (the
pair's index, then its x and dy rows), and rows used by many tokens (frequent words)
make some programs far longer than the rest. This measures, on the retrievals of a real
batch (the model after a few training steps) and on uniformly random ones:

- how the pairs spread over rows (quantiles, the longest row, the share in long rows);
- the kernel at eb7599d (one program per row, one pair a step, 1,024 columns, 4 warps)
  against: UNROLL pairs loaded per step (independent loads in flight at once), BLOCK_D
  columns per program, rows launched longest first (the long rows start first instead of
  last), and the library's pass, which cuts rows into parts of at most PART pairs
  (summed in order, then over the parts in order: a row of thousands of pairs is spread
  over many programs), swept over PART, BLOCK_D, warps and UNROLL.

Splitting a row's sum changes its rounding: each variant's largest difference from the
eb7599d kernel is printed. GPU time: CUDA events, median of 20; the library's time
includes its cumulative sums and searchsorted.

    python benchmarks/experiments/peer_row_pass.py --data .data/prose
    python benchmarks/experiments/peer_row_pass.py --layer   # the layer with either pass, issue 12's size
    python benchmarks/experiments/peer_row_pass.py --issue-size   # the variants on uniform retrievals there
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import median_ms

from finemoe.kernels import peer_experts as experts_kernel

timed = partial(median_ms, warmup=3, repeats=20)


@triton.jit
def _row_pass_variant(order_ptr, offsets_ptr, rows_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, du_ptr, dv_ptr, D,
                      J: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    """The row pass (GELU, PEER), one program per row (in the order ``rows``), UNROLL pairs per step."""
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    du = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    o = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    while o < end:
        for u in tl.static_range(UNROLL):
            ok = o + u < end
            pair = tl.load(order_ptr + o + u, mask=ok, other=0)
            n = pair // J
            pre = tl.load(pre_ptr + pair)
            w = tl.where(ok, tl.load(gate_ptr + pair).to(tl.float32), 0.0) * experts_kernel._act(pre, 0)
            g = tl.where(ok, tl.load(dpre_ptr + pair), 0.0)
            dy = tl.load(dy_ptr + n * D + cols, mask=dmask & ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + n * D + cols, mask=dmask & ok, other=0.0).to(tl.float32)
            du += g * x
            dv += w * dy
        o += UNROLL
    tl.store(dv_ptr + row * D + cols, dv.to(dv_ptr.dtype.element_ty), mask=dmask)
    tl.store(du_ptr + row * D + cols, du.to(du_ptr.dtype.element_ty), mask=dmask)


def _spread(idx_NJ: torch.Tensor, P: int) -> str:
    counts = torch.bincount(idx_NJ.reshape(-1), minlength=P).float()
    q = torch.quantile(counts, torch.tensor([0.5, 0.9, 0.99, 0.999], device=counts.device)).tolist()
    pairs = counts.sum().item()
    long_share = counts[counts > 256].sum().item() / pairs
    return (f"{int(pairs):,} pairs over {P:,} rows: {int((counts > 0).sum()):,} rows used; pairs per row median "
            f"{q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, p99.9 {q[3]:.0f}, max {int(counts.max())}; "
            f"{100 * long_share:.1f}% of pairs in rows of > 256 pairs")


def _time_variants(label: str, x, dy, idx_NJ, gates, pre, dpre, P: int) -> None:
    D = x.shape[1]
    J = idx_NJ.shape[1]
    rows_sorted, order = idx_NJ.reshape(-1).sort(stable=True)
    offsets = torch.searchsorted(rows_sorted, torch.arange(P + 1, device=x.device, dtype=rows_sorted.dtype))
    longest_first = (offsets[1:] - offsets[:-1]).argsort(descending=True, stable=True)
    in_order = torch.arange(P, device=x.device)
    d_in = torch.empty(P, D, device=x.device)
    d_out = torch.empty(P, D, device=x.device)

    def one_program_per_row(unroll=1, block_d=1024, warps=4, rows=in_order):
        _row_pass_variant[(P, triton.cdiv(D, block_d))](
            order, offsets, rows, x, dy, gates, pre, dpre, d_in, d_out, D, J=J, BLOCK_D=block_d, UNROLL=unroll,
            num_warps=warps)
        return d_in, d_out  # (no copies in the timed call: at 1024² rows they took 5 ms)

    def library():
        experts_kernel._row_gradients(order, offsets, x, dy, gates, pre, dpre, d_in, d_out, True, 0)
        return d_in, d_out

    def error(got, ref):
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))

    ref = tuple(t.clone() for t in one_program_per_row())
    print(f"\n{label}\n{_spread(idx_NJ, P)}")
    print("| variant | ms | max error vs the kernel at eb7599d (relative to the largest entry) |\n|---|---:|---:|")
    print(f"| the kernel at eb7599d: one program per row, one pair a step, 1024 columns, 4 warps | "
          f"{timed(one_program_per_row):.3f} | |")
    for unroll, block_d, warps in ((8, 1024, 8), (8, 256, 2)):
        for rows, order_name in ((in_order, ""), (longest_first, ", rows longest first")):
            run = partial(one_program_per_row, unroll, block_d, warps, rows)
            print(f"| one program per row, {unroll} pairs a step, {block_d} columns, {warps} warps{order_name} | "
                  f"{timed(run):.3f} | {error(run(), ref):.1e} |")
    saved = {name: getattr(experts_kernel, name) for name in ("_ROW_BLOCK_D", "_ROW_WARPS", "_ROW_UNROLL", "_ROW_PART")}
    for part in (256, 512, 2048):
        for block_d, warps in ((256, 2), (256, 4), (1024, 8)):
            for unroll in (1, 4):
                for name, value in zip(saved, (block_d, warps, unroll, part)):
                    setattr(experts_kernel, name, value)
                library_marker = " (the library's)" if (block_d, warps, unroll, part) == tuple(saved.values()) else ""
                print(f"| rows in parts of ≤ {part} pairs, {unroll} pairs a step, {block_d} columns, {warps} warps"
                      f"{library_marker} | {timed(library):.3f} | {error(library(), ref):.1e} |")
                sys.stdout.flush()
    for name, value in saved.items():
        setattr(experts_kernel, name, value)


def _real_retrievals(data: str, steps: int, preset: str = "s120m-peer"):
    """Train s120m-peer (seq 1024, batch 32) for ``steps`` steps, then the PEER layer's
    normalised input and retrievals for the next batch."""
    from finemoe.layers.peer import PEERFFN, fused_experts_input
    from finemoe.run_config import load_run_config
    from finemoe.train import Trainer

    cfg = load_run_config(preset, [
        f"data.path={data}", "train.seq_len=1024", "model.max_seq_len=1024", "train.batch_size=32",
        "train.compile=false", f"train.steps={steps + 1}", "train.warmup_steps=0", "train.eval_batches=0",
        "train.tensorboard=false", "train.out_dir=/tmp/peer_row_pass", f"train.checkpoint_every={steps + 10}"])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    for _ in range(steps):
        trainer.train_step()
    layer = next(m for m in trainer.model.modules() if isinstance(m, PEERFFN))
    seen = {}

    def keep_input(module, args, output):
        seen.setdefault("h", args[0].detach())

    hook = layer.register_forward_hook(keep_input)
    with torch.no_grad(), trainer._autocast():
        inputs, _ = trainer.batch(steps, 0)
        trainer.model(inputs.to(trainer.device))
    hook.remove()
    with torch.no_grad(), trainer._autocast():
        u_ND = layer.norm(seen["h"]).reshape(-1, seen["h"].shape[-1])
        idx_NHk, gates_NHk = layer.retrieval.route(u_ND)
        x = fused_experts_input(u_ND)
    N = x.shape[0]
    return x.contiguous(), idx_NHk.reshape(N, -1).contiguous(), gates_NHk.reshape(N, -1).float().contiguous(), layer


def _layer_ab() -> None:
    """The PEER layer at issue 12's size (16,384 tokens, d = 1024, 1024² experts, h = 8,
    k = 16, key width 256; random inputs), forward + backward under bf16 autocast, with
    the library's row pass and with the eb7599d kernel in its place, in one process."""
    from finemoe.layers import PEERConfig

    layer = PEERConfig(num_experts=1024**2, num_heads=8, top_k=16, key_dim=256).build(1024).cuda()
    h = torch.randn(32, 512, 1024, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(h).update
        out.float().square().mean().backward()

    def one_program_per_row(order, offsets, x, dy, gates, pre, dpre, d_in, d_out, has_u, act):
        P, D = d_out.shape
        _row_pass_variant[(P, triton.cdiv(D, 1024))](
            order, offsets, torch.arange(P, device=x.device), x, dy, gates, pre, dpre, d_in, d_out, D,
            J=gates.shape[1], BLOCK_D=1024, UNROLL=1, num_warps=4)

    library = experts_kernel._row_gradients
    print("\nPEER layer at issue 12's size, forward + backward (ms), one process:")
    for name, row_pass in (("library", library), ("eb7599d row pass", one_program_per_row),
                           ("library again", library)):
        experts_kernel._row_gradients = row_pass
        print(f"| {name} | {timed(step):.3f} |")
    experts_kernel._row_gradients = library


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", action="store_true", help="only the layer A/B at issue 12's size")
    parser.add_argument("--issue-size", action="store_true",
                        help="only the variants at issue 12's size (16,384 tokens, d = 1024, 1024² rows, J = 128), "
                             "uniform retrievals: ~2 pairs a row")
    parser.add_argument("--data", default=".data/prose")
    parser.add_argument("--steps", type=int, default=25)  # as `finemoe bench` (5 + 20)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.layer:
        _layer_ab()
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.issue_size:
        N, D, P, J = 16384, 1024, 1024 ** 2, 128
        x = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        dy = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        idx = torch.randint(0, P, (N, J), device="cuda", generator=g)
        gates = torch.rand(N, J, device="cuda", generator=g)
        pre = torch.randn(N, J, device="cuda", generator=g)
        dpre = torch.randn(N, J, device="cuda", generator=g) * 0.01
        _time_variants("uniformly random retrievals at issue 12's size", x, dy, idx, gates, pre, dpre, P)
        return
    x, idx, gates, layer = _real_retrievals(args.data, args.steps)
    N, D = x.shape
    P = layer.expert_out.shape[0]
    dy = (torch.randn(N, D, device="cuda", generator=g) * 0.02).to(x.dtype)
    pre = torch.randn(idx.shape, device="cuda", generator=g)
    dpre = torch.randn(idx.shape, device="cuda", generator=g) * 0.01
    _time_variants(f"real retrievals of s120m-peer after {args.steps} steps ({N:,} tokens, J = {idx.shape[1]})",
                   x, dy, idx, gates, pre, dpre, P)
    uniform = torch.randint(0, P, idx.shape, device="cuda", generator=g)
    _time_variants("uniformly random retrievals, same sizes", x, dy, uniform, gates, pre, dpre, P)


if __name__ == "__main__":
    main()
