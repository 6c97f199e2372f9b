"""Checkpoints: written atomically, found by run folder, loaded with a clear error.

A checkpoint is one ``torch.save`` file holding the model and optimizer state, the
step, RNG states, the resolved run config and the tokenizer (so a checkpoint alone is
enough to evaluate or sample). ``checkpoints/latest`` names the newest one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from finemoe.errors import InputError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "load_for_resume",
    "run_checkpoints",
    "load_model",
    "check_data_compatible",
]


class CheckpointError(InputError):
    """A missing, unreadable or mismatched checkpoint."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``:
    a kill at any moment leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    _atomic_torch_save(state, path)
    _atomic_write_text(path.name, folder / "latest")
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    for torn in folder.glob(".*.tmp-*"):  # left by a save that was killed
        torn.unlink(missing_ok=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run folder / checkpoints folder."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if folder.is_dir() and (folder / "latest").is_file():
            return folder / (folder / "latest").read_text().strip()
    if path.is_file():
        return path
    raise CheckpointError(f"{path}: no checkpoint there (a .pt file, or a run folder with checkpoints/latest)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many kinds on a torn or foreign file
        reason = (str(err).splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {reason})") from None
    missing = [k for k in ("model", "config", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a finemoe checkpoint (missing {', '.join(missing)})")
    state["path"] = str(path)
    return state


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``step_*.pt`` files of a run folder, newest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"), reverse=True)


def load_for_resume(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict | None, list[str]]:
    """The newest *intact* checkpoint of a run folder, and a note for each newer one that
    could not be read (a crash of the file system or a full disk can tear a file that
    was renamed into place). ``(None, [])`` when the folder has no checkpoint at all;
    ``CheckpointError`` when it has some but none can be read, so a resume never starts
    over a run's history."""
    folder = Path(run_dir) / "checkpoints"
    candidates = run_checkpoints(run_dir)
    latest = folder / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    if not candidates and named is None:
        return None, []
    skipped = [f"{folder / named}: named by {latest} but missing"] if named and not (folder / named).is_file() else []
    for path in candidates:
        try:
            return load_checkpoint(path, map_location), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    unreadable = ", ".join(p.name for p in candidates) or "none is left"
    raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from ({unreadable} unreadable); nothing was changed")


def same_tokenizer(a, b) -> bool:
    """Whether two ``tokenizers`` tokenizers map the same strings to the same ids."""
    return a.get_vocab(with_added_tokens=True) == b.get_vocab(with_added_tokens=True)


def check_data_compatible(checkpoint: str | Path, vocab_size: int, tokenizer, shards) -> None:
    """Refuse to run a model on token shards it cannot read: ids beyond its vocabulary,
    or ids of another tokenizer (which would give a meaningless perplexity even where
    the vocabulary sizes agree). ``tokenizer`` is the one the checkpoint carries, if any."""
    if shards.vocab_size > vocab_size:
        raise CheckpointError(f"{shards.folder}: its vocabulary ({shards.vocab_size:,}) is larger than that of "
                              f"{checkpoint} ({vocab_size:,}); use shards made with the model's tokenizer")
    if tokenizer is not None and not same_tokenizer(tokenizer, shards.tokenizer()):
        raise CheckpointError(f"{shards.folder} was tokenized with another tokenizer than the one {checkpoint} carries; "
                              f"rebuild the shards with `finemoe data --tokenizer` on the model's tokenizer")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, run_config, tokenizer)`` from a checkpoint file or run folder — or from a
    Hugging Face checkpoint folder or ``.gguf`` file, imported in memory
    (``finemoe.interop``); the model is in eval mode on ``device``."""
    from tokenizers import Tokenizer

    from finemoe.config import from_dict
    from finemoe.interop import is_hf_source, model_from_hf
    from finemoe.model import Transformer
    from finemoe.run_config import RunConfig

    if is_hf_source(path):
        model, run_config, hf = model_from_hf(path)
        tokenizer = Tokenizer.from_str(hf.tokenizer_json) if hf.tokenizer_json else None
        return model.to(device).eval(), run_config, tokenizer
    state = load_checkpoint(path)
    run_config = from_dict(RunConfig, state["config"])
    model = Transformer(run_config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{state['path']}: weights do not fit its config ({str(err).splitlines()[0]})") from None
    tokenizer = Tokenizer.from_str(state["tokenizer_json"]) if state.get("tokenizer_json") else None
    return model.to(device).eval(), run_config, tokenizer
