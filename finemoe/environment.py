"""Where a run runs: the machine and code it records (``git_commit``, ``environment``),
the accelerator's peak for MFU, and the device / process-group set-up of a training
process (single process, or one rank under ``torchrun``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["PEAK_BF16_FLOPS", "peak_flops", "git_commit", "environment", "distributed_setup", "pick_device",
           "use_compile_cache"]


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


def use_compile_cache() -> Path:
    """Where ``torch.compile`` keeps its compiled code between processes: the user's
    ``TORCHINDUCTOR_CACHE_DIR`` if set, else ``inductor/`` under finemoe's cache folder
    (``FINEMOE_CACHE``, default ``~/.cache/finemoe``), which outlives ``/tmp``. Inductor's
    graph caches are keyed by graph, inputs and torch version, so a repeated or resumed
    run with the same model loads its kernels instead of compiling them."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        root = Path(os.environ.get("FINEMOE_CACHE", Path.home() / ".cache" / "finemoe"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


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


def distributed_setup() -> tuple[int, int, int]:
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


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            from finemoe.config import ConfigError

            raise ConfigError("train.device", "'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(spec)

