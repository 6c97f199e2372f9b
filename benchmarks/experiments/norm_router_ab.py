"""A/B: the routed layers' norm and float32 router as one kernel pass
(``finemoe.kernels.norm_router``, the library) against RMSNorm + ``float32_linear`` (the
PyTorch path, as before), in one process: GPU time per compiled forward + backward (the
sum of the kernels' times under the profiler) and wall time as CUDA graphs with the
dense FFN timed just before and after. 16,384 tokens, d = 1024.

    python benchmarks/experiments/norm_router_ab.py
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from layer_benchmark import compiled, fwd_bwd, layer_configs, time_bracketed  # noqa: E402
from profile_layer import gpu_ms  # noqa: E402

from finemoe.config import from_dict  # noqa: E402
from finemoe.layers import FFNConfig  # noqa: E402
from finemoe.layers.common import float32_linear  # noqa: E402
from finemoe.layers.moe import MoEFFN  # noqa: E402


def pytorch_path(self, h_ND):
    """The norm and the router as before the kernels: RMSNorm, then one float32 product."""
    E = self.router.out_features
    if self.shared_gate is None:
        weight, bias = self.router.weight, None
    else:
        weight = torch.cat([self.router.weight, self.shared_gate.weight])
        bias = torch.cat([self.shared_gate.bias.new_zeros(E), self.shared_gate.bias])
    u_ND = self.norm(h_ND)
    logits_N = float32_linear(u_ND, weight, bias)
    return u_ND, logits_N[:, :E], None if self.shared_gate is None else logits_N[:, E:]


def main() -> None:
    d, tokens = 1024, 16384
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    h = torch.randn(tokens // 512, 512, d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    specs = layer_configs(d)
    names = ["moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
             "cartesian (8 sub-experts, k=2, + shared)"]
    dense = from_dict(FFNConfig, dict(specs["dense"])).build(d).cuda()
    dense_step = fwd_bwd(compiled(dense), h, cotangent, autocast)
    dense_graph = fwd_bwd(compiled(dense, cuda_graphs=True), h, cotangent, autocast)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"dense: GPU {gpu_ms(dense_step):.3f} ms")
    for name in names:
        cfg = from_dict(FFNConfig, dict(specs[name]))
        torch.manual_seed(0)
        kernels = cfg.build(d).cuda()
        before = cfg.build(d).cuda()
        before.load_state_dict(kernels.state_dict())
        for module in before.modules():
            if isinstance(module, MoEFFN):
                module._normed_input_and_logits = types.MethodType(pytorch_path, module)
        steps = {"pytorch": fwd_bwd(compiled(before), h, cotangent, autocast),
                 "kernels": fwd_bwd(compiled(kernels), h, cotangent, autocast)}
        graphs = {"pytorch": fwd_bwd(compiled(before, cuda_graphs=True), h, cotangent, autocast),
                  "kernels": fwd_bwd(compiled(kernels, cuda_graphs=True), h, cotangent, autocast)}
        gpu = {variant: [gpu_ms(step) for _ in range(2)] for variant, step in steps.items()}
        gpu_again = {variant: gpu_ms(step) for variant, step in steps.items()}
        line = [f"{name}:"]
        for variant in steps:
            ms, _, _, brackets = time_bracketed(graphs[variant], dense_graph, "cuda", 3, 20)
            ref = sorted(brackets)[len(brackets) // 2]
            flops = cfg.flops_per_token(d) / from_dict(FFNConfig, dict(specs["dense"])).flops_per_token(d)
            line.append(f"{variant} GPU {gpu[variant][0]:.3f} / {gpu[variant][1]:.3f} / {gpu_again[variant]:.3f} ms, "
                        f"graphs {ms:.3f} ms (dense {ref:.3f}: ratio {ref / ms * flops:.3f})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
