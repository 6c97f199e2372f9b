"""The analysis recorder: what layers report, summed over every batch of an analysis.

``finemoe.analysis.record`` runs the model with ``return_stats=True,
detailed_stats=True``; each layer adds typed records (``finemoe.layers.records``) and
the recorder merges them per place — ``layer3``, or ``layer3/A`` for a named part such
as CartesianMoE's sub-layers — and per kind of record. Records are already reduced over
the batch on the device (fixed-bin histograms, threshold counts, per-expert counts and
gate mass), so memory stays bounded however many batches stream through.
"""

from __future__ import annotations

from collections import defaultdict

from finemoe.layers.records import Record, merged

__all__ = ["Recorder"]


class Recorder:
    """Records per place and kind, merged over the batches ``add`` is given."""

    def __init__(self):
        self.records: dict[str, dict[str, Record]] = defaultdict(dict)
        """place (``layer3``, ``layer3/A``) → record name → the merged record"""

    def add(self, layer_stats: list[list[tuple[str, Record]]]) -> None:
        """One batch's ``ModelOutput.layer_stats``."""
        for i, records in enumerate(layer_stats):
            for (part, name), record in merged(records).items():
                store = self.records[f"layer{i}/{part}" if part else f"layer{i}"]
                store[name] = store[name].merge(record) if name in store else record

    def reset(self) -> None:
        self.records.clear()
