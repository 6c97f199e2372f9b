"""`finemoe study`: arms on the same data, conversions from an earlier arm, repeats,
the table, and a restart that skips finished arms."""

from __future__ import annotations

import json

import pytest

from finemoe.data import build_shards
from finemoe.study import load_study, run_study

TINY = ["model.vocab_size=300", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
        "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=1", "train.eval_batches=1", "train.device=cpu",
        "train.tensorboard=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    src = folder / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"Line {i}: " + " ".join(f"w{(i * 7 + j) % 53}" for j in range(60))}) + "\n"
                           for i in range(80)))
    build_shards([src], folder / "shards", vocab_size=300, val_fraction=0.2, progress=False)
    return folder / "shards"


def _study_file(tmp_path, shards):
    text = f"""
name: toy
claim: "a toy claim"
common: [data.path={shards}, train.steps=4, {", ".join(TINY)}]
arms:
  - {{name: dense, preset: tiny}}
  - {{name: moe, preset: tiny-moe, overrides: [model.ffn_layers.0.ffn.expert_intermediate_size=16], analyses: [robustness]}}
  - {{name: dsmoe, init: {{from: dense, convert: dsmoe, num_experts: 4}}, overrides: [train.steps=3], analyses: [dsmoe_sources]}}
  - {{name: split-moe, init: {{from: dense, convert: moe, num_experts: 4, top_k: 2}}, overrides: [train.steps=3]}}
  - {{name: pruned, init: {{from: dense, convert: prune, keep_fraction: 0.5}}, overrides: [train.steps=3]}}
repeat: {{arms: [dense], seeds: [1]}}
expect:
  - {{better: moe, than: [dense]}}
"""
    path = tmp_path / "toy.yaml"
    path.write_text(text)
    return path


def test_study_runs_converts_tabulates_and_resumes(tmp_path, shards, capsys):
    spec = _study_file(tmp_path, shards)
    out = tmp_path / "runs"
    table = run_study(str(spec), out, progress=False)
    runs = {r["run"]: r for r in table["rows"]}
    assert set(runs) == {"dense", "moe", "dsmoe", "split-moe", "pruned", "dense.seed1"}
    # conversions keep the source's attention and change the FFN
    assert runs["pruned"]["params"] < runs["dense"]["params"]
    assert runs["dsmoe"]["active_params"] <= runs["dense"]["active_params"] + 2 * 32 * 4  # gates added, blocks measured
    assert "perplexity_top1_disabled" in runs["moe"]
    assert runs["dense"]["val_perplexity"] != runs["dense.seed1"]["val_perplexity"]  # another seed, another run
    record = json.loads((out / "dense" / "run.json").read_text())
    assert record["tokens"] == 4 * 4 * 32 and record["hardware"] and record["wall_seconds"] > 0
    assert (out / "dsmoe" / "init.pt").is_file()
    assert len(table["verdicts"]) == 1 and "seed-to-seed spread" in table["verdicts"][0]
    md = (out / "table.md").read_text()
    assert "| dense |" in md and "a toy claim" in md
    # figures from the finished runs: always loss curves and perplexity per arm; the
    # rest where an arm asked for the analysis or the arms differ in activated parameters
    figures = {p.name for p in out.glob("*.png")}
    assert {"loss_curves.png", "perplexity.png", "robustness.png", "ppl_vs_active.png"} <= figures
    assert "product_key_usage.png" not in figures and "nsar.png" not in figures  # no arm asked for them

    # A rerun skips every finished arm and trains nothing.
    before = (out / "moe" / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = run_study(str(spec), out, progress=False)
    assert again["rows"] == table["rows"]
    assert (out / "moe" / "metrics.jsonl").read_text() == before
    assert capsys.readouterr().err.count("done, skipped") == 6


@pytest.mark.parametrize("name", ["cartesian", "finedeep", "dsmoe", "dsmoe-smollm2", "peer"])
def test_shipped_studies_load(name):
    study = load_study(name)
    assert study.arms and study.claim and study.expect


def test_bad_study_names_the_field(tmp_path):
    from finemoe.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text('name: x\nclaim: y\narms:\n  - {name: a, init: {from: b, convert: dsmoe}}\n')
    with pytest.raises(ConfigError, match="init.source 'b' must name an earlier arm"):
        load_study(str(bad))


def test_conversion_from_a_finished_arm_without_checkpoint_says_what_to_do(tmp_path, shards):
    import shutil

    from finemoe.config import ConfigError

    spec = _study_file(tmp_path, shards)
    out = tmp_path / "runs"
    run_study(str(spec), out, only=["dense"], progress=False)
    shutil.rmtree(out / "dense" / "checkpoints")  # as after copying results to a fresh machine
    with pytest.raises(ConfigError, match=r"arm 'dense' finished but its checkpoint is gone.*dense/summary.json"):
        run_study(str(spec), out, only=["dsmoe"], progress=False)


def test_arms_start_from_a_pretrained_model_on_disk(tmp_path, shards):
    """``init: {from: PATH}``: a Hugging Face folder (as ``finemoe import`` would read it),
    continued as it is and converted to DSMoE; calibration of activation pruning reads
    the arm's own data."""
    transformers = pytest.importorskip("transformers")
    import torch

    from finemoe.checkpoint import load_model

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text((shards / "tokenizer.json").read_text())
    common = [f"data.path={shards}", "train.steps=2", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=0",
              "train.eval_batches=1", "train.device=cpu", "train.tensorboard=false"]
    spec = tmp_path / "pre.yaml"
    spec.write_text(f"""
name: pre
claim: "from a pretrained model"
common: [{", ".join(common)}]
arms:
  - {{name: continued, init: {{from: {tmp_path / "hf"}}}}}
  - {{name: dsmoe, init: {{from: {tmp_path / "hf"}, convert: dsmoe, num_experts: 4}}}}
  - {{name: pruned, init: {{from: {tmp_path / "hf"}, convert: prune, keep_fraction: 0.5, calibration_tokens: 256}}}}
  - {{name: sparsegpt, init: {{from: {tmp_path / "hf"}, convert: sparsegpt, keep_fraction: 0.4, calibration_tokens: 256}}}}
""")
    table = run_study(str(spec), tmp_path / "runs", progress=False)
    assert {r["run"] for r in table["rows"]} == {"continued", "dsmoe", "pruned", "sparsegpt"}
    # SparseGPT's zeros survive the continued training: 40% of each FFN matrix stays nonzero
    trained, cfg, _ = load_model(tmp_path / "runs" / "sparsegpt")
    assert cfg.train.keep_zero_weights
    rows = {r["run"]: r for r in table["rows"]}
    ffn_weights = 2 * 3 * 32 * 48  # two layers of three 32 × 48 matrices
    assert rows["continued"]["active_params"] - rows["sparsegpt"]["active_params"] == pytest.approx(0.6 * ffn_weights, abs=8)
    for block in trained.blocks:
        for proj in (block.ffn.mlp.gate_proj, block.ffn.mlp.up_proj, block.ffn.mlp.down_proj):
            assert abs((proj.weight != 0).float().mean().item() - 0.4) < 0.02
    _, cfg, _ = load_model(tmp_path / "runs" / "dsmoe")
    assert cfg.model.ffn.kind == "dsmoe" and cfg.model.d_model == 32
    _, cfg, _ = load_model(tmp_path / "runs" / "pruned")
    assert cfg.model.ffn.intermediate_size == 24
