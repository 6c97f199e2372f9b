"""The top-level configuration of a finemoe run, and how it is assembled.

A run config comes from a preset name (a YAML file shipped in ``finemoe/configs``)
or a path to a YAML file, then dotted command-line overrides on top::

    finemoe info -c tiny-moe model.ffn_layers.0.ffn.num_experts=16
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from typing import Literal

from finemoe.config import ConfigError, apply_overrides, check, from_dict, load_yaml
from finemoe.model import ModelConfig

__all__ = ["RunConfig", "TrainConfig", "DataConfig", "DEFAULT_PRESET", "list_presets", "preset_path",
           "load_run_config"]

DEFAULT_PRESET = "tiny"


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
    compile_scope: Literal["blocks", "model"] = "blocks"
    """With ``compile``: each transformer block compiled on its own (fast compilation:
    blocks of one structure share their graphs), or the whole model as one graph."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """``torch.compile``'s mode. ``reduce-overhead`` replays the compiled regions as CUDA
    graphs (no host launch cost: for models whose step is bound by the host); it needs
    ``grad_accum = 1``, since a replay reuses the memory of the previous one's gradients."""
    device: str = "auto"
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    """With several processes (torchrun): FSDP2 (fully_shard) or DDP."""
    log_every: int = 10
    gc_every: int = 50
    """Python's garbage collector runs every this many steps while training (generations
    0 and 1, as torchtitan does) instead of whenever allocations trigger it: an automatic
    full collection over the objects compilation leaves behind can stall the GPU for half
    a second at an unforeseeable step. 0 leaves the collector as it is."""
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    init_from: str | None = None
    """Start from these model weights (a checkpoint file or run folder whose model config
    equals this run's), e.g. a dense model converted to DSMoE; the optimizer starts fresh."""
    keep_zero_weights: str | None = None
    """A glob of parameter names (``fnmatch``, e.g. ``blocks.*.ffn.mlp.*``) whose entries
    that are exactly zero when training starts stay zero: they are zeroed again after
    every optimizer step (a fixed sparsity mask, as in retraining after SparseGPT or
    magnitude pruning). Their gradients and AdamW moments are still computed; only the
    weights are projected back onto the mask. A resumed run finds the same mask in its
    checkpoint's zeros."""
    row_sparse_updates: bool = False
    """Update the row tables the model declares (PEER's and PKM's expert tables) only in
    the rows each step touched: lazy AdamW (``finemoe.optim.RowSparseAdamW``; how it
    differs from AdamW is stated there). Not with FSDP."""
    tensorboard: bool = True
    """Also write TensorBoard logs, when the tensorboard package is installed."""
    final_eval: bool = True
    """Evaluate on the whole validation split at the end."""
    repeat_batch: bool = False
    """Train every step on the first step's batch: overfitting one batch, the check
    ``finemoe smoke`` runs (a model that cannot learn one batch has a bug)."""

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
        check(self.gc_every >= 0, "gc_every", "must be >= 0 (0: Python's automatic collection)")
        check(self.compile_mode != "reduce-overhead" or self.grad_accum == 1, "compile_mode",
              "reduce-overhead (CUDA graphs) needs grad_accum = 1")



@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    end_tokens: list[str] | None = None
    """Tokens that end a generated text (an imported model's end-of-text and end-of-turn
    tokens, e.g. ``<|im_end|>``); default ``<|endoftext|>``."""

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def _presets_dir() -> Path:
    return Path(str(resources.files("finemoe") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped preset of that name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError("config", f"config file {name_or_path!r} does not exist")
        return path
    candidate = _presets_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError("config", f"no preset {name_or_path!r}; presets: {', '.join(list_presets())}")
    return candidate


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; a mapping whose ``kind`` differs from the base's (an FFN of
    another kind) replaces it instead of merging into it."""
    if "kind" in top and top.get("kind") != base.get("kind"):
        return dict(top)
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset_data(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A preset's YAML as data, with ``base: <preset>`` resolved: the named preset's
    data, deep-merged under this one's (lists are replaced, not merged; a mapping with a
    different ``kind`` replaces the base's)."""
    if name_or_path in _seen:
        raise ConfigError("base", f"presets inherit in a cycle: {' -> '.join(_seen + (name_or_path,))}")
    data = load_yaml(preset_path(name_or_path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"must name a preset, got {base!r}")
    return _deep_merge(load_preset_data(base, _seen + (name_or_path,)), data)


def load_run_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = load_preset_data(name_or_path or DEFAULT_PRESET)
    apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)
