"""Where one layer's forward + backward spends its GPU time: the top kernels by CUDA
time (torch.profiler), for layers named as in ``layer_benchmark.py``.

    python benchmarks/profile_layer.py "finedeep 2x4" "moe E=8 k=2" --d 1024 --tokens 16384 [--compile] [--host]
    python benchmarks/profile_layer.py --config 'sub={"kind": "moe", "num_experts": 8}' sub --d 768

A name is one of ``layer_benchmark.py``'s layers or one given with ``--config NAME=JSON``
(an FFN config, e.g. the layer of a preset at its own width).

With ``--host``, also where the host's time goes: each call timed alone (synchronised
after it, as ``layer_benchmark.py`` does), the same calls queued back to back (one
synchronisation at the end: what a layer costs inside a model whose host runs ahead),
the host time to issue one call, and the top CPU-side operations (a
``cudaStreamSynchronize`` or device-to-host copy there is a host sync).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layer_benchmark import fwd_bwd, layer_configs  # noqa: E402

from finemoe.config import from_dict  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402


def kernel_averages(step, steps: int, warmup: int = 1):
    """``torch.profiler``'s per-kernel averages over ``steps`` calls of ``step`` (after
    ``warmup`` calls), GPU activity only."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


def gpu_ms(step, calls: int = 10) -> float:
    """GPU time per call of ``step``: the sum of its kernels' times under the profiler
    (timed by the wall clock, small compiled calls are bound by the host's ~2 ms a call)."""
    return sum(e.self_device_time_total for e in kernel_averages(step, calls, warmup=3)) / 1e3 / calls


def print_profile(step, steps: int, rows: int, name_width: int = 70) -> None:
    """The top CUDA kernels of ``steps`` calls of ``step`` (after one warm call)."""
    averages = kernel_averages(step, steps)
    print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=name_width))


def print_host_time(step, steps: int, rows: int, name_width: int = 70) -> None:
    """Synchronised and queued times per call, host issue time, top CPU-side operations."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity, profile

    def synced() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    alone = statistics.median(synced() for _ in range(steps))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(steps):
        step()
    issued = (time.perf_counter() - t0) * 1e3 / steps
    end.record()
    torch.cuda.synchronize()
    queued = start.elapsed_time(end) / steps
    print(f"  per call: alone {alone:.3f} ms, queued {queued:.3f} ms, host issue {issued:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=name_width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="A layer of your own: NAME=JSON, the JSON an FFN config (repeatable).")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="Profile each layer under torch.compile.")
    parser.add_argument("--host", action="store_true", help="Also the host side: alone/queued/issue times, CPU ops.")
    args = parser.parse_args()
    configs = layer_configs(args.d)
    for item in args.config:
        name, _, text = item.partition("=")
        configs[name] = json.loads(text)
    h = torch.randn(args.tokens // 512, 512, args.d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for name in args.names:
        layer = from_dict(FFNConfig, dict(configs[name])).build(args.d).cuda().train()
        if args.compile:
            layer = torch.compile(layer)
        step = fwd_bwd(layer, h, cotangent, autocast)
        for _ in range(2):  # compilation and autotuning before the profiled steps
            step()
        print(f"== {name}{' [compiled]' if args.compile else ''} (5 steps)")
        print_profile(step, 5, args.rows)
        if args.host:
            print_host_time(step, 20, args.rows)


if __name__ == "__main__":
    main()
