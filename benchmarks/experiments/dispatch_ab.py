"""Experiment: the routed layers under torch.compile with each of this version's two
dispatch changes switched back, all in one process (run-to-run spread of compiled
timings on the device is ~10%, so versions are only compared within one run):

- ``current``: gate/up as one grouped GEMM + packed SwiGLU; ``sum_slots`` kernel;
- ``two GEMMs``: gate and up as two grouped GEMMs (the previous version);
- ``index_copy + sum``: the previous combine (rows put back in slot order, summed
  over K by PyTorch / Inductor);
- ``both old``.

    python benchmarks/experiments/dispatch_ab.py [--eager] [--layers "dense;moe E=8 k=2"]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer_benchmark import fwd_bwd, layer_configs, time_ms  # noqa: E402

from finemoe.config import from_dict  # noqa: E402
from finemoe.kernels import grouped_mm  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402
from finemoe.layers import experts as experts_module  # noqa: E402
from finemoe.layers.common import swiglu_hidden  # noqa: E402

CURRENT_RUN, CURRENT_SUM = experts_module._run_grouped_mm, experts_module.sum_slots


def two_gemms(x_SD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD, scale_S1, module):
    dtype = experts_module.compute_dtype(x_SD)
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    x_SD = x_SD.to(dtype)
    hidden_SF = swiglu_hidden(grouped_mm(x_SD, w_gate_EDF.to(dtype), offs_E),
                              grouped_mm(x_SD, w_up_EDF.to(dtype), offs_E), module, block_scale=scale_S1)
    return grouped_mm(hidden_SF, w_down_EFD.to(dtype), offs_E)


def index_copy_sum(y_SD, position_S, order_S, K):
    return torch.empty_like(y_SD).index_copy_(0, order_S, y_SD).view(-1, K, y_SD.shape[-1]).sum(1)


VARIANTS = {"current": (CURRENT_RUN, CURRENT_SUM), "two GEMMs": (two_gemms, CURRENT_SUM),
            "index_copy + sum": (CURRENT_RUN, index_copy_sum), "both old": (two_gemms, index_copy_sum)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="dense;moe E=8 k=2;moe E=64 k=8 (fine-grained);"
                                            "moe SMoE-Share (E=8 k=2 F/4 + shared);cartesian (8 sub-experts, k=2, + shared)",
                        help="Layer names as in layer_benchmark.py, separated by ';'.")
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    d, tokens = 1024, 16384
    h = torch.randn(tokens // 512, 512, d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    names = args.layers.split(";")
    print(f"| layer ({'eager' if args.eager else 'compiled'}, ms) | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---:|" * len(VARIANTS))
    for name in names:
        cells = []
        for run, combine in VARIANTS.values():
            experts_module._run_grouped_mm, experts_module.sum_slots = run, combine
            torch._dynamo.reset()
            torch.manual_seed(0)
            layer = from_dict(FFNConfig, dict(layer_configs(d)[name])).build(d).cuda().train()
            if not args.eager:
                layer = torch.compile(layer)
            ms, _, _ = time_ms(fwd_bwd(layer, h, cotangent, autocast), "cuda", 5, 30)
            cells.append(f"{ms:.3f}")
            if name == "dense":
                cells = [cells[0]] * len(VARIANTS)
                break
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
