"""Experiment: token-choice experts on QuACK's grouped GEMMs (``finemoe.kernels.quack_experts``:
the slot gather inside the GEMMs' A loads, SwiGLU in their epilogues, float32 weight
gradients) against finemoe's grouped_mm path, in one process.

1. Agreement at the benchmark's shapes: the layer's output and every gradient under bf16
   autocast, QuACK against grouped_mm, both against the float32 grouped_mm layer.
2. GPU time (profiler) per forward + backward, eager and compiled, every routed layer
   that dispatches by token choice.
3. The kernels of one QuACK step (profile).

    PYTHONPATH=<quack's site> python benchmarks/experiments/quack_experts_ab.py
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiled_ab import compare
from layer_benchmark import fwd_bwd, layer_configs
from profile_layer import gpu_ms, print_profile

from finemoe.config import from_dict
from finemoe.layers import FFNConfig, experts

ROUTED = ("moe E=8 k=2", "moe E=64 k=8 (fine-grained)", "moe SMoE-Share (E=8 k=2 F/4 + shared)",
          "cartesian (8 sub-experts, k=2, + shared)")
_original = experts._runs_on_quack


def _use(quack: bool):
    def setup():
        experts._runs_on_quack = ((lambda impl, x, stats: stats is None and x.dtype == torch.bfloat16
                                   and experts.quack_available(x)) if quack else (lambda *a: False))

        def restore():
            experts._runs_on_quack = _original
        return restore
    return setup


def _grads(layer, h, cotangent, autocast):
    h = h.detach().clone().requires_grad_(True)
    with autocast:
        out = layer(h)
    update = out.update if hasattr(out, "update") else out
    update.backward(cotangent.to(update.dtype))
    grads = {"out": update.detach().float(), "h": h.grad.float()}
    grads.update({n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None})
    layer.zero_grad(set_to_none=True)
    return grads


def agreement(names, d: int = 1024, tokens: int = 16384) -> None:
    configs = layer_configs(d)
    torch.manual_seed(0)
    h = torch.randn(tokens // 512, 512, d, device="cuda")
    cotangent = torch.randn(h.shape, device="cuda")
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16)
    off = torch.autocast("cuda", enabled=False)
    print("relative error ‖a − ref‖ / ‖ref‖ against the float32 grouped_mm layer (worst tensor, and which)")
    for name in names:
        torch.manual_seed(0)
        layer = from_dict(FFNConfig, dict(configs[name])).build(d).cuda().train()
        restore = _use(False)()
        reference = _grads(layer, h, cotangent, off)
        grouped = _grads(layer, h, cotangent, bf16)
        restore()
        restore = _use(True)()
        try:
            quack = _grads(layer, h, cotangent, bf16)
        except Exception:  # noqa: BLE001  (report and go on to the next layer)
            traceback.print_exc()
            continue
        finally:
            restore()
        for label, got in (("grouped_mm bf16", grouped), ("quack bf16", quack)):
            errors = {k: ((got[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item()
                      for k in reference}
            worst = max(errors, key=errors.get)
            print(f"  {name}: {label}: out {errors['out']:.2e}, h {errors['h']:.2e}, worst {worst} "
                  f"{errors[worst]:.2e}", flush=True)
        between = {k: ((quack[k] - grouped[k]).norm() / grouped[k].norm().clamp_min(1e-30)).item() for k in grouped}
        print("  quack vs grouped_mm: " + ", ".join(f"{k} {v:.1e}" for k, v in between.items()), flush=True)


def eager_times(names, d: int = 1024, tokens: int = 16384) -> None:
    configs = layer_configs(d)
    h = torch.randn(tokens // 512, 512, d, device="cuda", requires_grad=True)
    cotangent = torch.randn(h.shape, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    print("| layer (eager) | grouped_mm | quack |\n|---|---:|---:|")
    for name in names:
        torch.manual_seed(0)
        layer = from_dict(FFNConfig, dict(configs[name])).build(d).cuda().train()
        times = []
        for quack in (False, True):
            restore = _use(quack)()
            try:
                times.append(f"{gpu_ms(fwd_bwd(layer, h, cotangent, autocast), calls=10):.3f}")
            except Exception:  # noqa: BLE001  (report and go on)
                traceback.print_exc()
                times.append("failed")
            finally:
                restore()
        print(f"| {name} | {times[0]} | {times[1]} |", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if "--compiled-only" in sys.argv:  # the quack rows alone, compiled (e.g. one setting against another)
        compare(("dense",) + ROUTED[:2], {"quack": _use(True)})
        sys.exit()
    if "--skip-agreement" not in sys.argv:
        agreement(ROUTED)
    eager_times(("dense",) + (ROUTED if "--skip-agreement" not in sys.argv else ROUTED[:2]))
    try:
        compare(("dense",) + ROUTED[:2], {"grouped_mm": _use(False), "quack": _use(True)})
    except Exception:  # noqa: BLE001  (report and go on)
        traceback.print_exc()
    for name in ("moe E=8 k=2", "moe E=64 k=8 (fine-grained)"):
        print(f"\nkernels of one compiled QuACK step: {name}")
        restore = _use(True)()
        torch._dynamo.reset()
        layer = torch.compile(from_dict(FFNConfig, dict(layer_configs(1024)[name])).build(1024).cuda().train())
        h = torch.randn(32, 512, 1024, device="cuda", requires_grad=True)
        print_profile(fwd_bwd(layer, h, torch.randn_like(h), torch.autocast("cuda", dtype=torch.bfloat16)), 5, 25)
        restore()
