"""Training: AdamW, warm-up + cosine/WSD schedule, clipping, accumulation, bf16
autocast, optional ``torch.compile``, FSDP2 or DDP under ``torchrun``; atomic
checkpoints and exact resume; metrics to JSONL (and TensorBoard when installed).

Training knows nothing of any FFN design: it adds the model's ``aux_loss`` (each
kind weighs its own losses) and logs whatever auxiliary losses and routing
statistics the layers report.

Exact resume: the global batch of step s is drawn from a generator seeded by
``(seed, s)`` (each rank and micro-step takes its slice), and the learning rate is a
function of s, so the data position *is* the step; a checkpoint holds model,
optimizer, step and RNG states.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from finemoe.checkpoint import (CheckpointError, check_data_compatible, load_checkpoint, load_for_resume,
                                run_checkpoints, save_checkpoint)
from finemoe.config import check, to_dict

__all__ = ["TrainConfig", "DataConfig", "Trainer", "TrainingDiverged", "lr_at", "peak_flops"]


@dataclass
class DataConfig:
    path: str | None = None
    """Token shards written by `finemoe data`; default: the corpus embedded in finemoe."""


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    """Sequences per micro-batch, per process."""
    grad_accum: int = 1
    seq_len: int | None = None
    """Default: model.max_seq_len."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    """WSD: the final share of steps over which the learning rate decays linearly."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype; auto: bfloat16 on CUDA, float32 on CPU."""
    compile: bool = False
    device: str = "auto"
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    """With several processes (torchrun): FSDP2 (fully_shard) or DDP."""
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    init_from: str | None = None
    """Start from these model weights (a checkpoint file or run folder whose model config
    equals this run's), e.g. a dense model converted to DSMoE; the optimizer starts fresh."""
    tensorboard: bool = True
    """Also write TensorBoard logs, when the tensorboard package is installed."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(self.seq_len is None or self.seq_len > 0, "seq_len", "must be positive")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(0 <= self.warmup_steps < self.steps, "warmup_steps", f"must be in [0, steps={self.steps})")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.eval_batches >= 0, "eval_batches", "must be >= 0")


class TrainingDiverged(RuntimeError):
    pass


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``, or WSD (constant,
    then linear decay over the last ``decay_fraction`` of steps), or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
    if step < decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - floor) * (step - decay_start + 1) / max(1, cfg.steps - decay_start)


# Dense bf16 peak of each accelerator, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# -- environment ------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """HEAD of the checkout (``+dirty`` with uncommitted changes), or ``FINEMOE_GIT_COMMIT``
    where the code was copied without its ``.git`` (a remote GPU machine, a container)."""
    if os.environ.get("FINEMOE_GIT_COMMIT"):
        return os.environ["FINEMOE_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, world_size: int) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "world_size": world_size,
        "device": str(device),
        "command": " ".join(sys.argv),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# -- the trainer ------------------------------------------------------------------------------------------


class Trainer:
    """Build from a ``RunConfig`` (model, train, data, seed) and call ``fit()``."""

    def __init__(self, run_config, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
        from finemoe.data import TokenShards, embedded_shards
        from finemoe.model import Transformer

        self.run_config = run_config
        self.cfg: TrainConfig = run_config.train
        self.progress = progress
        self.rank, self.world_size, local_rank = _distributed_setup()
        self.device = _pick_device(self.cfg.device, local_rank)
        self.is_main = self.rank == 0
        self.out_dir = Path(self.cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if not resume:
            self._claim_out_dir(overwrite)

        data_path = run_config.data.path or embedded_shards(progress=progress and self.is_main)
        self.data = TokenShards(data_path)
        self.tokenizer_json = self.data.tokenizer().to_str()
        model_cfg = run_config.model
        if model_cfg.vocab_size < self.data.vocab_size:
            from finemoe.config import ConfigError

            raise ConfigError(
                "model.vocab_size",
                f"{model_cfg.vocab_size} is smaller than the data's vocabulary ({self.data.vocab_size}, {data_path})",
            )
        self.seq_len = self.cfg.seq_len or model_cfg.max_seq_len
        if self.seq_len > model_cfg.max_seq_len:
            from finemoe.config import ConfigError

            raise ConfigError("train.seq_len", f"{self.seq_len} exceeds model.max_seq_len ({model_cfg.max_seq_len})")
        self.data.check_window("train", self.seq_len, "lower train.seq_len or add data")
        if self.cfg.eval_batches:  # found now, not at the first evaluation hundreds of steps in
            self.data.check_window("val", self.seq_len, "build the data with a validation split (--val-fraction or "
                                   "--val-input), or set train.eval_batches=0 to train without evaluating")

        torch.manual_seed(run_config.seed)
        self.model = Transformer(model_cfg)
        # train.init_from seeds a fresh run; a run resumed from its own checkpoint ignores it
        if self.cfg.init_from and not (resume and (self.ckpt_dir / "latest").is_file()):
            self._load_init(self.cfg.init_from)
        self.model = self.model.to(self.device)
        self.autocast_dtype = self._autocast_dtype()
        self.wrapped = self._parallelize(self.model)
        self.optimizer = self._optimizer()
        self.step = 0
        if resume:
            self._resume()
        self.forward = torch.compile(self.wrapped) if self.cfg.compile else self.wrapped
        self.flops_per_token = 3 * model_cfg.flops_per_token(self.seq_len)  # forward + backward
        self.peak = peak_flops(self.device)

    # -- setup -------------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        if self.cfg.dtype == "bfloat16" or (self.cfg.dtype == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _parallelize(self, model):
        if self.world_size == 1:
            return model
        if self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5
            from torch.distributed._composable.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        # Decay matrices and embeddings; not norms, biases or BatchNorm (1-D parameters).
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2))
        if self.device.type == "cuda" and self.world_size == 1:
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, **kwargs)

    # -- state -------------------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.model, self.optimizer, options=opts)
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path | None:
        model_sd, optim_sd = self._state_dicts()
        if not self.is_main:
            return None
        state = {
            "model": model_sd,
            "optimizer": optim_sd,
            "step": self.step,
            "config": to_dict(self.run_config),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "data": {"path": str(self.data.folder), "tokenizer_sha256": self.data.manifest["tokenizer"]["sha256"],
                     "fingerprint": self.data.manifest.get("fingerprint")},
            "tokenizer_json": self.tokenizer_json,
        }
        return save_checkpoint(self.ckpt_dir, self.step, state, self.cfg.keep_checkpoints)

    def _claim_out_dir(self, overwrite: bool) -> None:
        """A fresh run never writes over another run's history unless asked to."""
        held = run_checkpoints(self.out_dir) or (self.ckpt_dir / "latest").is_file() or (self.out_dir / "summary.json").is_file()
        if not held:
            return
        if not overwrite:
            raise CheckpointError(f"{self.out_dir} already holds a run; pass --resume to continue it, or --overwrite "
                                  "to start over (its checkpoints and metrics are deleted)")
        if self.is_main:
            import shutil

            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                (self.out_dir / name).unlink(missing_ok=True)

    def _check_state(self, state: dict, what: str) -> None:
        """A checkpoint this run loads must be of its model, and of its tokenizer."""
        if state["config"].get("model") != to_dict(self.run_config.model):
            raise CheckpointError(f"{state['path']}: its model config differs from this run's ({what})")
        tokenizer = None
        if state.get("tokenizer_json"):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(state["tokenizer_json"])
        check_data_compatible(state["path"], self.run_config.model.vocab_size, tokenizer, self.data)

    def _load_init(self, path: str) -> None:
        state = load_checkpoint(path)
        self._check_state(state, "train.init_from")
        self.model.load_state_dict(state["model"])
        if self.is_main:
            print(f"initialised from {state['path']}", file=sys.stderr)

    def _resume(self) -> None:
        state, skipped = load_for_resume(self.out_dir, map_location="cpu")
        if self.is_main:
            for note in skipped:
                print(f"resume: skipping a damaged checkpoint: {note}", file=sys.stderr)
        if state is None:
            if self.is_main:
                print(f"resume: no checkpoint in {self.out_dir}; starting from step 0", file=sys.stderr)
            return
        self._check_state(state, "resume with the same config")
        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.is_main:
            print(f"resumed from {state['path']} at step {self.step}", file=sys.stderr)

    # -- data --------------------------------------------------------------------------------------------
    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's micro-batch of the global batch of ``step``.

        The global batch (batch_size × world_size × grad_accum windows) is drawn from a
        generator seeded by (seed, step) alone, and micro-step m of rank r takes rows
        ``[(m·world + r)·B, … + B)``: any split of one global batch over processes and
        accumulation steps trains on the same data (and a resumed run too)."""
        cfg = self.cfg
        if getattr(self, "_global_step", None) != step:
            generator = np.random.default_rng([self.run_config.seed, step])
            rows = cfg.batch_size * self.world_size * cfg.grad_accum
            self._global_batch = self.data.sample("train", rows, self.seq_len, generator)
            self._global_step = step
        first = (micro * self.world_size + self.rank) * cfg.batch_size
        window = torch.from_numpy(self._global_batch[first : first + cfg.batch_size])
        window = window.to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        from finemoe.evaluate import evaluate_perplexity

        self.model.eval()
        with self._autocast():
            result = evaluate_perplexity(
                self.wrapped, self.data, split="val", seq_len=self.seq_len, batch_size=self.cfg.batch_size,
                max_batches=max_batches, device=self.device, progress=False,
            )
        self.model.train()
        return result

    def close(self) -> None:
        """Leave the process group (torchrun) cleanly."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        logger = MetricsLogger(self.out_dir, enabled=self.is_main, tensorboard=cfg.tensorboard, start_step=self.step)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.run_config), sort_keys=False))
            env = environment(self.device, self.world_size) | {"data": self.data.describe()}
            (self.out_dir / "environment.json").write_text(json.dumps(env, indent=2, default=str))
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        try:
            return self._loop(bar, logger)
        finally:  # an error is then printed on a line of its own, not glued to the bar's
            bar.close()
            logger.close()

    def _loop(self, bar, logger: "MetricsLogger") -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.seq_len * cfg.grad_accum * self.world_size
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        while self.step < cfg.steps:
            step = self.step
            lr = lr_at(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            totals: dict[str, float] = {}
            stats_sum: list[dict[str, torch.Tensor]] | None = None
            want_stats = (step + 1) % cfg.log_every == 0
            for micro in range(cfg.grad_accum):
                inputs, targets = self.batch(step, micro)
                with self._autocast():
                    out = self.forward(inputs, targets, return_stats=want_stats and micro == 0)
                (out.loss / cfg.grad_accum).backward()
                for name, value in [("loss", out.loss), ("lm_loss", out.lm_loss), ("aux_loss", out.aux_loss)] + [
                    (f"aux/{k}", v) for k, v in out.aux_losses.items()
                ]:
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / cfg.grad_accum
                if out.layer_stats is not None:
                    stats_sum = out.layer_stats
            loss_t = totals["loss"]
            if self.world_size > 1:
                import torch.distributed as dist

                for t in totals.values():  # SUM then divide: gloo has no AVG
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
                    t.div_(self.world_size)
            loss = float(loss_t)
            if not math.isfinite(loss):
                last = (self.ckpt_dir / "latest").read_text().strip() if (self.ckpt_dir / "latest").is_file() else None
                raise TrainingDiverged(
                    f"non-finite loss ({loss}) at step {step}; nothing was saved for this step"
                    + (f"; the last good checkpoint is {self.ckpt_dir / last}" if last else "")
                )
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window_tokens += tokens_per_step

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed
                record = {"step": self.step, "lr": lr, "tokens": self.step * tokens_per_step, "tokens_per_s": tok_s}
                record |= {k: float(v) for k, v in totals.items()}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if self.peak:
                    record["mfu"] = self.flops_per_token * tok_s / self.world_size / self.peak
                if stats_sum is not None:
                    record |= layer_stat_summary(stats_sum)
                logger.log(record)
                postfix = {"loss": f"{float(totals['lm_loss']):.3f}", "tok/s": f"{tok_s:,.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{record['mfu']:.1%}"
                bar.set_postfix(postfix, refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval_batches and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                last_eval = self.evaluate(cfg.eval_batches)
                logger.log({"step": self.step} | {f"val/{k}": v for k, v in last_eval.items()})
                window_start = time.perf_counter()  # keep evaluation out of tokens/s
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
                window_start = time.perf_counter()
            bar.update(1)
        bar.close()
        final = self.evaluate(None) if self.data.num_tokens("val") > self.seq_len else last_eval
        summary = {"step": self.step, "final_val": final, "params": self.run_config.model.num_params()}
        if self.is_main:
            logger.log({"step": self.step} | {f"final_val/{k}": v for k, v in final.items()})
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def layer_stat_summary(layer_stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-layer scalars for the log: load imbalance (max/mean) of every expert-load
    vector, DSMoE's active share, router entropy; vectors stay out of the JSONL."""
    out: dict[str, float] = {}
    for i, stats in enumerate(layer_stats):
        for name, value in stats.items():
            value = value.detach().float()
            if value.numel() == 1:
                out[f"layer{i}/{name}"] = float(value)
            elif name.endswith("expert_load"):
                out[f"layer{i}/{name}_imbalance"] = float(value.max() / value.mean().clamp_min(1e-12))
            elif name.endswith("gate_mass"):
                out[f"layer{i}/{name.replace('gate_mass', 'retrieved_share')}"] = float((value > 0).float().mean())
    return out


def _logged_before(line: str, start_step: int) -> bool:
    """Whether a metrics line belongs to the steps a resumed run does not repeat."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill
        return False
    return record.get("step", 0) <= start_step and not any(k.startswith("final_val/") for k in record)


class MetricsLogger:
    """``metrics.jsonl`` (and TensorBoard). A run starting at ``start_step`` keeps only the
    records up to that step: those written after the checkpoint it resumed from (or all,
    for a fresh start in a used folder) would otherwise be logged twice."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if path.is_file() and start_step > 0:
            kept = [line for line in path.read_text().splitlines() if line.strip() and _logged_before(line, start_step)]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a" if start_step > 0 else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _distributed_setup() -> tuple[int, int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return dist.get_rank(), world_size, local_rank


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            from finemoe.config import ConfigError

            raise ConfigError("train.device", "'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(spec)

