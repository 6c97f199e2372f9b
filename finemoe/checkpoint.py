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

__all__ = ["CheckpointError", "save_checkpoint", "resolve_checkpoint", "load_checkpoint", "load_model"]


class CheckpointError(ValueError):
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
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    missing = [k for k in ("model", "config", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a finemoe checkpoint (missing {', '.join(missing)})")
    state["path"] = str(path)
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, run_config, tokenizer)`` from a checkpoint file or run folder; the
    model is in eval mode on ``device``."""
    from tokenizers import Tokenizer

    from finemoe.config import from_dict
    from finemoe.model import Transformer
    from finemoe.run_config import RunConfig

    state = load_checkpoint(path)
    run_config = from_dict(RunConfig, state["config"])
    model = Transformer(run_config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{state['path']}: weights do not fit its config ({str(err).splitlines()[0]})") from None
    tokenizer = Tokenizer.from_str(state["tokenizer_json"]) if state.get("tokenizer_json") else None
    return model.to(device).eval(), run_config, tokenizer
