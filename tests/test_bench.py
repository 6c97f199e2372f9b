"""``finemoe bench`` and the trainer's compilation: every kind compiled per block trains
without recompiling after warm-up and without graph breaks (counted on the CPU)."""

import json

import pytest

from finemoe.bench import bench_preset
from finemoe.cli import main

KINDS = ["tiny", "tiny-moe", "tiny-finedeep", "tiny-dsmoe", "tiny-cartesian", "tiny-peer", "tiny-pkm", "tiny-hash",
         "tiny-topp"]
SMALL = ["train.batch_size=2", "train.seq_len=16"]


@pytest.mark.parametrize("preset", KINDS)
def test_every_kind_compiled_per_block_has_no_recompiles_or_graph_breaks(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    row = bench_preset(preset, steps=2, warmup=3, overrides=SMALL + ["train.compile=true"])
    assert row.graph_breaks == 0
    assert row.recompiles_after_warmup == 0
    assert row.graphs >= 2  # the training graph, and the one that also returns statistics
    assert len(row.step_ms) == 2 and row.tokens_per_s > 0


def test_bench_command_writes_its_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "-p", "tiny,tiny-moe,tiny+train.batch_size=1", "--steps", "2", "--warmup", "2",
                 "--no-compile", "--out", str(out), *SMALL]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["preset"] for r in result["rows"]] == ["tiny", "tiny-moe", "tiny+train.batch_size=1"]
    # the preset's own override comes after the command's (train.batch_size=2)
    assert [r["tokens_per_step"] for r in result["rows"]] == [32, 32, 16]
    assert all(r["graphs"] == 0 and len(r["step_ms"]) == 2 for r in result["rows"])
    table = out.with_suffix(".md").read_text()
    assert "| tiny-moe |" in table and table in capsys.readouterr().out
