"""Forward + backward time of one FFN layer of every kind, at one stated size.

Each kind runs in its own process, so the peak memory reported is that layer's alone.
Timings are medians over repeats after a warm-up; on CUDA they are taken with events
under bf16 autocast. Writes a JSON file and a Markdown table (with the hardware)::

    python benchmarks/layer_benchmark.py --device cpu --out results/layer_benchmark_cpu
    python benchmarks/layer_benchmark.py --device cuda --out results/layer_benchmark_h100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

D_MODEL = 512
BATCH, SEQ = 8, 512

# One layer of every kind at d_model = 512; the routed and product-key layers at the
# sizes their papers use where that fits (PEER: N = 1024², h = 8, k = 16).
KINDS = {
    "dense": {"kind": "dense", "intermediate_size": 2048},
    "moe": {"kind": "moe", "num_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_size": 1024},
    "finedeep": {"kind": "finedeep", "num_sublayers": 4, "experts_per_sublayer": 4, "expert_intermediate_size": 128},
    "dsmoe": {"kind": "dsmoe", "intermediate_size": 2048, "num_experts": 8},
    "cartesian": {"kind": "cartesian", "num_experts": 8, "num_experts_per_tok": 2, "expert_intermediate_size": 512},
    "peer": {"kind": "peer", "num_experts": 1024**2, "num_heads": 8, "top_k": 16, "key_dim": 128},
    "pkm": {"kind": "pkm", "num_experts": 1024**2, "num_heads": 8, "top_k": 32, "key_dim": 128},
}


def hardware(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def measure(kind: str, device: str, repeats: int) -> dict:
    import torch

    from finemoe.config import from_dict
    from finemoe.layers import FFNConfig

    torch.manual_seed(0)
    cfg = from_dict(FFNConfig, dict(KINDS[kind]))
    layer = cfg.build(D_MODEL).to(device).train()
    h = torch.randn(BATCH, SEQ, D_MODEL, device=device, requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            out = layer(h)
        out.update.float().sum().backward()

    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
        if i > 0:
            times.append(elapsed)
        layer.zero_grad(set_to_none=True)
        h.grad = None
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = BATCH * SEQ
    median = statistics.median(times)
    return {
        "kind": kind,
        "config": KINDS[kind],
        "params": cfg.num_params(D_MODEL),
        "active_params": cfg.num_active_params(D_MODEL),
        "fwd_flops_per_token": cfg.flops_per_token(D_MODEL),
        "fwd_bwd_seconds_median": median,
        "fwd_bwd_seconds_all": times,
        "tokens_per_second": tokens / median,
        # training ≈ 3 × forward FLOPs
        "achieved_tflops": 3 * cfg.flops_per_token(D_MODEL) * tokens / median / 1e12,
        "peak_memory_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="Path stem for .json and .md results.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one kind
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.one, args.device, args.repeats)))
        return

    rows = []
    for kind in args.kinds.split(","):
        cmd = [sys.executable, __file__, "--one", kind, "--device", args.device, "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            print(f"{kind}: failed\n{proc.stderr}", file=sys.stderr)
            rows.append({"kind": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{kind:10s} {row['fwd_bwd_seconds_median'] * 1e3:9.1f} ms  {row['tokens_per_second']:10,.0f} tok/s  "
              f"peak {row['peak_memory_bytes'] / 2**30:6.2f} GiB", flush=True)

    import torch

    header = (
        f"One FFN layer, forward + backward, d_model = {D_MODEL}, batch {BATCH} × {SEQ} tokens, "
        f"{'bf16 autocast' if args.device == 'cuda' else 'float32'}; median of {args.repeats} after a warm-up.\n\n"
        f"Hardware: {hardware(args.device)}.\n\n"
        f"Command: `python benchmarks/layer_benchmark.py --device {args.device}"
        f"{' --out ' + args.out if args.out else ''}`\n\n"
    )
    lines = [
        "| kind | config | params | active params | fwd FLOPs/token | fwd+bwd (ms) | tokens/s | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error']} | | | | | | |")
            continue
        conf = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "kind")
        lines.append(
            f"| {r['kind']} | {conf} | {r['params'] / 1e6:,.1f}M | {r['active_params'] / 1e6:,.2f}M | "
            f"{r['fwd_flops_per_token'] / 1e6:,.2f}M | {r['fwd_bwd_seconds_median'] * 1e3:,.1f} | "
            f"{r['tokens_per_second']:,.0f} | {r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"hardware": hardware(args.device), "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(table)
    del torch


if __name__ == "__main__":
    main()
