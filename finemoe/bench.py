"""``finemoe bench``: the training speed of presets side by side, in one process, through
the trainer itself (its compilation, loss, optimizer and data path), so the numbers are
those of ``finemoe train``.

For each preset: warm-up steps (the first compiles; step 1 also returns statistics, as
the trainer's log steps do, so both graphs exist before timing), then timed steps with
a CUDA event at each step boundary and one synchronisation at the end. Reported: tokens/s
and MFU (from the model's own FLOP count) over the timed steps, the spread of step times,
peak GPU memory, the first step's time (compilation included), the graphs compiled and
those compiled after warm-up (recompiles: should be 0), graph breaks, and the last loss.

    finemoe bench -p s120m,s120m-moe --steps 30 --out results/bench_h100
    finemoe bench -p s120m-peer,s120m-peer+train.row_sparse_updates=true   # an option on and off
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["BenchRow", "CompileCounter", "bench_preset", "bench_markdown"]


class CompileCounter:
    """Graphs compiled and graph breaks, from ``torch._dynamo``'s counters, since ``reset``."""

    def reset(self) -> None:
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @staticmethod
    def graph_breaks() -> int:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))


@dataclass
class BenchRow:
    preset: str
    params: int
    active_params: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float | None
    step_ms_median: float
    step_ms_p10: float
    step_ms_p90: float
    peak_gib: float | None
    first_step_s: float
    graphs: int
    recompiles_after_warmup: int
    graph_breaks: int
    final_loss: float
    step_ms: list[float]
    profile: str | None = None


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


class _StepClock:
    """Step boundaries as CUDA events (read once at the end), or wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def bench_preset(preset: str, *, steps: int, warmup: int, overrides: list[str] | None = None,
                 work_dir: str | Path | None = None, profile: bool = False) -> BenchRow:
    """Train ``preset`` (with ``overrides``) for ``warmup`` + ``steps`` steps and measure
    the last ``steps``. Nothing is saved; the run folder is a temporary one. With
    ``profile``, three more steps under ``torch.profiler``: ``row.profile`` holds the top
    operations by GPU time and by host (CPU) time."""
    from finemoe.environment import peak_flops
    from finemoe.run_config import load_run_config
    from finemoe.train import Trainer

    total = warmup + steps
    with contextlib.ExitStack() as stack:
        folder = Path(work_dir) / preset if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg = load_run_config(preset, list(overrides or []) + [
            f"train.steps={total}", "train.warmup_steps=0", "train.eval_batches=0", f"train.log_every={total}",
            f"train.checkpoint_every={total}", "train.tensorboard=false", f"train.out_dir={folder}"])
        counter = CompileCounter()
        counter.reset()
        trainer = Trainer(cfg, overwrite=True, progress=False)
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with trainer.scheduled_gc():  # as `finemoe train` runs its steps
            started = time.perf_counter()
            trainer.train_step()
            trainer.check_finite()  # a host sync: the first step (and its compilation) is done
            first_step_s = time.perf_counter() - started
            for i in range(1, warmup):
                trainer.train_step(want_stats=i == 1)
            graphs_at_warmup = counter.graphs()
            clock = _StepClock(device)
            clock.mark()
            for _ in range(steps):
                result = trainer.train_step()
                clock.mark()
            times = clock.step_ms()
            trainer.check_finite()
        table = _profile(trainer, device, steps=3) if profile else None
        final_loss = float(result["totals"]["lm_loss"])
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        tokens_per_step = cfg.train.batch_size * trainer.seq_len * cfg.train.grad_accum * trainer.world_size
        tokens_per_s = tokens_per_step * len(times) / (sum(times) / 1e3)
        flops = trainer.flops_per_token * tokens_per_s / trainer.world_size
        chip_peak = peak_flops(device)
        trainer.close()
        return BenchRow(
            preset=preset, params=cfg.model.num_params(), active_params=cfg.model.num_active_params(),
            tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_s, mfu=flops / chip_peak if chip_peak else None,
            step_ms_median=statistics.median(times), step_ms_p10=_quantile(times, 0.1), step_ms_p90=_quantile(times, 0.9),
            peak_gib=peak, first_step_s=first_step_s, graphs=counter.graphs(),
            recompiles_after_warmup=counter.graphs() - graphs_at_warmup, graph_breaks=counter.graph_breaks(),
            final_loss=final_loss, step_ms=times, profile=table)


def _profile(trainer, device: torch.device, steps: int, rows: int = 50) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        trainer.check_finite()
    averages = prof.key_averages()
    tables = [f"{steps} steps, by self CPU time:\n"
              + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=80)]
    if device.type == "cuda":
        # by self time: kernels, not the operators that nest them (each would repeat its kernels' time)
        tables.insert(0, f"{steps} steps, kernels by GPU time:\n"
                      + averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=80))
    return "\n".join(tables)


def bench_markdown(rows: list[BenchRow], header: dict) -> str:
    """The table, with the hardware, commit and command above it."""
    base = next((r for r in rows if r.mfu), None)
    lines = [f"# Training speed, {header['hardware']}", "",
             f"Commit `{header['commit']}`; command `{header['command']}`.",
             f"{header['warmup']} warm-up steps (the first compiles), then {header['steps']} timed steps (CUDA events at "
             "the step boundaries, one synchronisation at the end; wall time on a CPU). MFU from the model's own FLOP count "
             "(forward + backward = 3 × forward) against the chip's dense bf16 peak.", "",
             "| preset | params | tokens/step | tokens/s | MFU | MFU / first row | step ms (p10 / median / p90) | "
             "peak GiB | first step s | graphs | recompiles after warm-up | graph breaks | loss |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "—"
        rel = f"{r.mfu / base.mfu:.2f}" if r.mfu is not None and base else "—"
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "—"
        lines.append(f"| {r.preset} | {r.params / 1e6:.1f}M | {r.tokens_per_step:,} | {r.tokens_per_s:,.0f} | {mfu} | {rel} | "
                     f"{r.step_ms_p10:.1f} / {r.step_ms_median:.1f} / {r.step_ms_p90:.1f} | {peak} | "
                     f"{r.first_step_s:.1f} | {r.graphs} | {r.recompiles_after_warmup} | {r.graph_breaks} | "
                     f"{r.final_loss:.3f} |")
    return "\n".join(lines) + "\n"


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
