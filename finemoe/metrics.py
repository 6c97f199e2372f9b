"""A run's metrics: ``metrics.jsonl`` (and TensorBoard when installed), resumed without
duplicates, and the per-layer scalars the trainer logs from what the layers report."""

from __future__ import annotations

import json
import os
from pathlib import Path

from finemoe.layers.records import Record, merged

__all__ = ["MetricsLogger", "layer_stat_summary"]


def layer_stat_summary(layer_stats: list[list[tuple[str, Record]]]) -> dict[str, float]:
    """Per-layer scalars for the log, from what each layer's statistics records say they
    mean for training (``Record.scalars``: load imbalance, router entropy, active share,
    retrieved share...), named ``layer{i}[/part]/{scalar}``; vectors stay out of the JSONL."""
    out: dict[str, float] = {}
    for i, records in enumerate(layer_stats):
        for (part, _), record in merged(records).items():
            prefix = f"layer{i}/{part}/" if part else f"layer{i}/"
            out.update({prefix + name: value for name, value in record.scalars().items()})
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
