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
import fnmatch
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finemoe.checkpoint import (CheckpointError, check_data_compatible, load_checkpoint, load_for_resume,
                                run_checkpoints, save_checkpoint)
from finemoe.config import to_dict
from finemoe.environment import distributed_setup, environment, peak_flops, pick_device, use_compile_cache
from finemoe.metrics import MetricsLogger, layer_stat_summary
from finemoe.run_config import DataConfig, TrainConfig

# TrainConfig and DataConfig live with the other run configs (finemoe.run_config); re-exported here
__all__ = ["TrainConfig", "DataConfig", "Trainer", "TrainingDiverged", "lr_at"]


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


# -- the trainer ------------------------------------------------------------------------------------------


class Trainer:
    """Build from a ``RunConfig`` (model, train, data, seed) and call ``fit()``."""

    def __init__(self, run_config, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
        from finemoe.data import TokenShards, embedded_shards
        from finemoe.model import Transformer

        self.run_config = run_config
        self.cfg: TrainConfig = run_config.train
        self.progress = progress
        self.rank, self.world_size, local_rank = distributed_setup()
        self.device = pick_device(self.cfg.device, local_rank)
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
        self._masked_params, self._masks = self._zero_masks()
        self._start_step = self.step
        self._first_bad = self._bad_loss = None
        self.first_step_s: float | None = None
        self.forward = self._compile() if self.cfg.compile else self.wrapped
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
        tables = self._row_tables()
        table_ids = {id(t) for t in tables}
        decay = [p for p in self.model.parameters() if p.ndim >= 2 and id(p) not in table_ids]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2))
        if self.device.type == "cuda" and self.world_size == 1:
            kwargs["fused"] = True
        if not tables:
            return torch.optim.AdamW(groups, **kwargs)
        from finemoe.optim import RowSparseAdamW

        groups.append({"params": tables, "weight_decay": self.cfg.weight_decay, "row_sparse": True})
        return RowSparseAdamW(groups, **kwargs)

    def _row_tables(self) -> list:
        """The model's row tables, when ``train.row_sparse_updates`` asks for lazy updates."""
        if not self.cfg.row_sparse_updates:
            return []
        from finemoe.config import ConfigError

        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            raise ConfigError("train.row_sparse_updates", "is not supported with FSDP; use train.parallel=ddp")
        tables = self.model.row_tables()
        if not tables:
            raise ConfigError("train.row_sparse_updates", "no FFN layer of this model reads a table by row "
                              "(product-key layers such as peer and pkm do)")
        return tables

    def _zero_masks(self) -> tuple[list, list]:
        """``train.keep_zero_weights``: the parameters it names and, for each, a mask that is
        0 where the weight is exactly zero now and 1 elsewhere."""
        pattern = self.cfg.keep_zero_weights
        if not pattern:
            return [], []
        named = [(n, p) for n, p in self.model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
        if not named:
            from finemoe.config import ConfigError

            raise ConfigError("train.keep_zero_weights", f"{pattern!r} matches no parameter name (e.g. "
                              f"{next(n for n, _ in self.model.named_parameters())})")
        zeros = sum(int((p == 0).sum()) for _, p in named)  # on every process: a collective under FSDP
        self.weights_kept_zero = zeros
        total = sum(p.numel() for _, p in named)
        if self.is_main:
            print(f"train.keep_zero_weights: {zeros:,} of {total:,} weights in {len(named)} tensors stay zero",
                  file=sys.stderr)
        return [p for _, p in named], [(p != 0).to(p.dtype) for _, p in named]

    def _compile(self):
        """``compile_scope = "blocks"``: each transformer block compiled in place (blocks of
        one structure share their graphs; the embedding, final norm and chunked loss run
        eagerly), as torchtitan does; ``"model"``: the whole model as one graph. Compiled
        code is cached on disk (``finemoe.environment.use_compile_cache``), so a repeated or
        resumed run reuses it."""
        use_compile_cache()
        # Dynamo's cache is per code object and per process: blocks of models trained
        # earlier in this process (a study's arms) would count towards this model's
        # recompile limit, and past it Dynamo falls back to eager
        torch._dynamo.reset()
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        if self.cfg.compile_scope == "model":
            return torch.compile(self.wrapped, mode=mode)
        for block in self.model.blocks:
            block.compile(mode=mode)
        return self.wrapped

    def _report_first_step(self, started: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.first_step_s = time.perf_counter() - started
        if self.is_main:
            print(f"first step, compilation included: {self.first_step_s:.1f} s", file=sys.stderr)

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
        saved_lazy = bool(state["config"].get("train", {}).get("row_sparse_updates", False))
        if saved_lazy != self.cfg.row_sparse_updates:  # the optimizer's groups differ
            raise CheckpointError(f"{state['path']}: saved with train.row_sparse_updates={str(saved_lazy).lower()}; "
                                  "resume with the same setting")
        if self.world_size > 1 and self.cfg.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            self.model.load_state_dict(state["model"])
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:  # e.g. written when a layer stored its weights as other tensors
                raise CheckpointError(f"{state['path']}: its optimizer state does not fit this model's parameters "
                                      f"({e}); start a new run from its weights with train.init_from") from None
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
        step = 0 if cfg.repeat_batch else step
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
            with self.scheduled_gc():
                return self._loop(bar, logger)
        finally:  # an error is then printed on a line of its own, not glued to the bar's
            bar.close()
            logger.close()

    def train_step(self, want_stats: bool = False) -> dict:
        """One optimizer step at ``self.step`` (then advanced): every micro-batch's forward
        and backward, clipping, the update. Nothing is read back to the host: the result
        holds device tensors (``totals``: the losses averaged over micro-batches and
        processes; ``grad_norm``; ``layer_stats`` when ``want_stats``), and a non-finite
        loss is remembered on the device until ``check_finite`` reads it."""
        cfg = self.cfg
        step = self.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        totals: dict[str, torch.Tensor] = {}
        layer_stats = None
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
                layer_stats = out.layer_stats
        if self.world_size > 1:
            import torch.distributed as dist

            for t in totals.values():  # SUM then divide: gloo has no AVG
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.world_size)
        self._remember_non_finite(step, totals["loss"])
        grad_norm = self._clip_gradients(cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.optimizer.step()
        if self._masks:
            with torch.no_grad():
                torch._foreach_mul_(self._masked_params, self._masks)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if cfg.gc_every and self.step % cfg.gc_every == 0:
            gc.collect(1)  # the young generations only: milliseconds (see scheduled_gc)
        return {"totals": totals, "grad_norm": grad_norm, "layer_stats": layer_stats}

    def _clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The gradients' total norm, and every gradient scaled to at most ``max_norm``; by
        the optimizer where it clips its own (``RowSparseAdamW`` scales the row tables'
        inside its update)."""
        clip = getattr(self.optimizer, "clip_grad_norm_", None)
        return clip(max_norm) if clip is not None else torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    @contextlib.contextmanager
    def scheduled_gc(self):
        """Python's automatic garbage collection paused for the block (when ``gc_every``
        is set): ``train_step`` collects the young generations every ``gc_every`` steps
        instead, so no full collection stalls a step at random. The collector's state is
        restored after the block."""
        if not self.cfg.gc_every or not gc.isenabled():
            yield
            return
        gc.collect()
        gc.disable()
        try:
            yield
        finally:
            gc.enable()

    def _remember_non_finite(self, step: int, loss: torch.Tensor) -> None:
        """Keep the first step whose loss is not finite, and that loss, on the device."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = (self._first_bad < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(first, step, self._first_bad)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def check_finite(self) -> None:
        """Raise ``TrainingDiverged`` if a step since the start had a non-finite loss (a
        host sync: called at logging and checkpoint steps, so no bad state is saved)."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        last = (self.ckpt_dir / "latest").read_text().strip() if (self.ckpt_dir / "latest").is_file() else None
        raise TrainingDiverged(
            f"non-finite loss ({float(self._bad_loss)}) at step {int(self._first_bad)}; nothing was saved after it"
            + (f"; the last good checkpoint is {self.ckpt_dir / last}" if last else "")
        )

    def _loop(self, bar, logger: "MetricsLogger") -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.seq_len * cfg.grad_accum * self.world_size
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        while self.step < cfg.steps:
            step = self.step
            lr = lr_at(step, cfg)
            # A compiled model has a second graph for the steps that return statistics;
            # asking for them at step 1 compiles it during warm-up, not at the first log step.
            want_stats = (step + 1) % cfg.log_every == 0 or (cfg.compile and step == 1)
            started = time.perf_counter() if step == self._start_step else None
            result = self.step_result = self.train_step(want_stats)
            if started is not None and cfg.compile:
                self._report_first_step(started)
            totals, grad_norm = result["totals"], result["grad_norm"]
            stats_sum = result["layer_stats"] if (step + 1) % cfg.log_every == 0 else None
            window_tokens += tokens_per_step

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.check_finite()  # reads the device: the window's work is done after it
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed
                record = {"step": self.step, "lr": lr, "tokens": self.step * tokens_per_step, "tokens_per_s": tok_s}
                record |= {k: float(v) for k, v in totals.items()}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
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
                self.check_finite()
                self.save()
                window_start = time.perf_counter()
            bar.update(1)
        bar.close()
        final = self.evaluate(None) if cfg.final_eval and self.data.num_tokens("val") > self.seq_len else last_eval
        summary = {"step": self.step, "final_val": final, "params": self.run_config.model.num_params()}
        if self._masks:  # train.keep_zero_weights: these weights are structurally zero, not active
            summary["weights_kept_zero"] = self.weights_kept_zero
        if self.first_step_s is not None:
            summary["first_step_s"] = round(self.first_step_s, 2)
        if self.is_main:
            logger.log({"step": self.step} | {f"final_val/{k}": v for k, v in final.items()})
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
