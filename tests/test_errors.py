"""Bad input, tried as a new user would: every case ends with one line naming the
problem and exit status 2 (or works as documented), never a traceback; a damaged
checkpoint never makes a run start over its history; evaluation does not depend on
the batch size."""

from __future__ import annotations

import json

import pytest
import torch

from finemoe.checkpoint import CheckpointError, load_checkpoint
from finemoe.cli import main
from finemoe.config import ConfigError
from finemoe.data import build_shards
from finemoe.run_config import load_run_config
from finemoe.train import Trainer

TEXTS = [f"Line {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40 + i % 13)) for i in range(120)]
OTHER_TEXTS = [f"Zeile {i}: " + " ".join(f"wort{(i * 5 + j) % 89}" for j in range(30 + i % 7)) for i in range(120)]
SMALL = ["model.vocab_size=320", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
         "model.max_seq_len=32", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
         "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "train.checkpoint_every=4",
         "train.tensorboard=false"]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_shards([_jsonl(root / "a.jsonl", TEXTS)], root / "shards", vocab_size=320, val_fraction=0.1, progress=False)
    # same vocabulary size, another tokenizer
    build_shards([_jsonl(root / "b.jsonl", OTHER_TEXTS)], root / "other", vocab_size=320, val_fraction=0.1,
                 progress=False)
    build_shards([_jsonl(root / "c.jsonl", TEXTS)], root / "bigger", vocab_size=400, val_fraction=0.1, progress=False)
    build_shards([root / "a.jsonl"], root / "noval", tokenizer_path=root / "shards" / "tokenizer.json",
                 val_fraction=0.0, progress=False)
    return root


def _config(data, out_dir, *extra):
    return load_run_config("tiny", [f"data.path={data / 'shards'}", f"train.out_dir={out_dir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    Trainer(_config(data, out, "train.steps=4"), progress=False).fit()
    return out


def cli(capsys, *args) -> tuple[int, str]:
    """Run the console script in this process; its exit status and everything it printed."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm_loss"] for r in rows if "lm_loss" in r}


# -- 1. resume from a damaged checkpoint ----------------------------------------------------------------


def test_resume_falls_back_to_the_newest_intact_checkpoint(data, tmp_path, capsys):
    constant = "train.schedule=constant"  # the learning rate of a step does not depend on train.steps
    full = tmp_path / "full"
    Trainer(_config(data, full, "train.steps=12", constant), progress=False).fit()
    split = tmp_path / "split"
    Trainer(_config(data, split, "train.steps=8", constant), progress=False).fit()
    latest = split / "checkpoints" / "step_0000008.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # torn by a crash of the file system
    capsys.readouterr()
    resumed = Trainer(_config(data, split, "train.steps=12", constant), resume=True, progress=False)
    notes = capsys.readouterr().err
    assert "skipping a damaged checkpoint" in notes and "step_0000008.pt" in notes
    assert resumed.step == 4
    resumed.fit()
    # the run continues its own history: the same losses as the uninterrupted run, logged once each
    assert _losses(split) == _losses(full)
    assert load_checkpoint(split)["step"] == 12


def test_resume_with_no_intact_checkpoint_stops_and_changes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_config(data, out, "train.steps=8"), progress=False).fit()
    for path in (out / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in list(out.iterdir()) + list((out / "checkpoints").iterdir()) if p.is_file()}
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        Trainer(_config(data, out, "train.steps=12"), resume=True, progress=False)
    code, output = cli(capsys, "train", "-c", "tiny", "--data", data / "shards", "--out", out, "--resume", *SMALL,
                       "train.steps=12")
    assert_one_line_error(code, output, "no intact checkpoint", "nothing was changed")
    after = {p.name: p.read_bytes() for p in list(out.iterdir()) + list((out / "checkpoints").iterdir()) if p.is_file()}
    assert after == before


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(data, run, capsys):
    code, output = cli(capsys, "train", "-c", "tiny", "--data", data / "shards", "--out", run, *SMALL, "train.steps=4")
    assert_one_line_error(code, output, "already holds a run", "--resume", "--overwrite")


# -- 2. one line instead of a traceback ----------------------------------------------------------------


@pytest.fixture
def parquet_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": TEXTS[:3]}), tmp_path / "no_text.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": TEXTS[:3]}), tmp_path / "good.parquet")
    good = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "corrupt.parquet").write_bytes(good[: len(good) // 2])
    return tmp_path


@pytest.mark.parametrize("name,fragment", [("no_text.parquet", "no 'text' column (columns: body)"),
                                           ("corrupt.parquet", "not a readable Parquet file"),
                                           ("ints.parquet", "column 'text' holds int64, not strings")])
def test_bad_parquet_is_one_line(parquet_files, capsys, name, fragment):
    code, output = cli(capsys, "data", parquet_files / name, "-o", parquet_files / "out", "--vocab-size", "300")
    assert_one_line_error(code, output, name, fragment)
    assert not (parquet_files / "out").exists()


@pytest.mark.parametrize("entry,field", [({"ffn": {"kind": "dense"}}, "model.ffn_layers[0].layers"),
                                         ({"layers": "all"}, "model.ffn_layers[0].ffn")])
def test_ffn_layers_entry_missing_a_field(tmp_path, capsys, entry, field):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"ffn_layers": [entry]}}))
    for command in ("info", "train"):
        code, output = cli(capsys, command, "-c", config)
        assert_one_line_error(code, output, f"{field}: is required")


def test_data_without_a_validation_split(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, output = cli(capsys, "train", "-c", "tiny", "--data", data / "noval", "--out", out, *SMALL, "train.steps=8")
    assert_one_line_error(code, output, "the val split has no window of 33 tokens", "train.eval_batches=0")
    assert not (out / "checkpoints").exists()
    # without periodic evaluation it trains, and says so by reporting no validation numbers
    code, output = cli(capsys, "train", "-c", "tiny", "--data", data / "noval", "--out", out, *SMALL, "train.steps=4",
                       "train.eval_batches=0")
    assert code == 0, output
    code, output = cli(capsys, "eval", out, "--device", "cpu")
    assert_one_line_error(code, output, "the val split has no window")


@pytest.mark.parametrize("shards,fragment", [("bigger", "is larger than that of"),
                                             ("other", "was tokenized with another tokenizer")])
def test_eval_on_shards_of_another_tokenizer(data, run, capsys, shards, fragment):
    code, output = cli(capsys, "eval", run, "--data", data / shards, "--device", "cpu")
    assert_one_line_error(code, output, fragment)
    code, output = cli(capsys, "analyze", run, "--data", data / shards, "--device", "cpu", "--out", data / "an",
                       "--batches", "1")
    assert_one_line_error(code, output, fragment)


def test_init_from_a_checkpoint_of_another_tokenizer(data, run, tmp_path):
    cfg = load_run_config("tiny", [f"data.path={data / 'other'}", f"train.out_dir={tmp_path / 'x'}", *SMALL,
                                   f"train.init_from={run}"])
    with pytest.raises(CheckpointError, match="another tokenizer"):
        Trainer(cfg, progress=False)


@pytest.mark.parametrize("args,fragment", [
    (["eval", "{run}", "--batch-size", "0"], "'--batch-size'"),
    (["generate", "{run}", "--num-samples", "0"], "'--num-samples'"),
])
def test_impossible_counts(run, capsys, args, fragment):
    code, output = cli(capsys, *[a.format(run=run) for a in args])
    assert_one_line_error(code, output, fragment)


# -- 3. the converter refuses what it cannot map ---------------------------------------------------------


def test_hf_config_fields_that_finemoe_does_not_implement_are_refused_by_name():
    transformers = pytest.importorskip("transformers")
    from finemoe.convert import model_config_from_hf

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    assert model_config_from_hf(transformers.MixtralConfig(**small)).ffn.kind == "moe"
    with pytest.raises(ConfigError, match="^sliding_window: 4096 is not supported"):
        model_config_from_hf(transformers.MixtralConfig(**small, sliding_window=4096))
    with pytest.raises(ConfigError, match="^router_jitter_noise"):
        model_config_from_hf(transformers.MixtralConfig(**small, router_jitter_noise=0.1))
    as_json = transformers.MixtralConfig(**small).to_dict() | {"qk_layernorm": True}
    with pytest.raises(ConfigError, match="^qk_layernorm: unknown to finemoe's mixtral converter"):
        model_config_from_hf(as_json)


# -- 4. surprises in the CLI ----------------------------------------------------------------------------------


def test_overriding_the_ffn_kind_replaces_the_section(capsys):
    code, output = cli(capsys, "info", "model.ffn.kind=moe", "model.ffn.num_experts=4", "--yaml")
    assert code == 0, output
    assert load_run_config(None, ["model.ffn.num_experts=4", "model.ffn.kind=moe"]).model.ffn.num_experts == 4
    assert "kind: moe" in output and "intermediate_size:" not in output.replace("expert_intermediate_size", "")


def test_an_error_during_a_progress_bar_starts_its_own_line(data, tmp_path, capsys, monkeypatch):
    from finemoe.data import DataError

    real_batch = Trainer.batch

    def failing_batch(self, step, micro):
        if step == 2:
            raise DataError("the disk went away")
        return real_batch(self, step, micro)

    monkeypatch.setattr(Trainer, "batch", failing_batch)
    code, output = cli(capsys, "train", "-c", "tiny", "--data", data / "shards", "--out", tmp_path / "r", *SMALL,
                       "train.steps=4")
    assert_one_line_error(code, output, "the disk went away")


def test_a_failed_data_command_leaves_no_folder_behind(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    code, output = cli(capsys, "data", bad, "-o", tmp_path / "a" / "b" / "out", "--vocab-size", "300")
    assert_one_line_error(code, output, "not UTF-8")
    assert not (tmp_path / "a").exists()


# -- 5. evaluation does not depend on the batch size ------------------------------------------------------------


def test_expert_choice_scores_do_not_depend_on_the_batch(data):
    from finemoe.data import TokenShards
    from finemoe.evaluate import evaluate_perplexity, score_task
    from finemoe.model import Transformer

    cfg = load_run_config("tiny", [*SMALL, "model.ffn.kind=moe", "model.ffn.routing=expert_choice",
                                   "model.ffn.num_experts=4", "model.ffn.expert_intermediate_size=16"]).model
    assert cfg.couples_sequences
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    shards = TokenShards(data / "shards")
    tokenizer = shards.tokenizer()
    rows = [{"context": TEXTS[i][:20 + 7 * i], "choices": [" word1 word2", " word3", " Line 9: word4 word5 word6"],
             "gold": i % 3} for i in range(9)]
    one = score_task(model, tokenizer, "piqa", rows, max_len=32, batch_size=1)
    nine = score_task(model, tokenizer, "piqa", rows, max_len=32, batch_size=9)
    assert one == nine
    a = evaluate_perplexity(model, shards, seq_len=32, batch_size=1, progress=False)
    b = evaluate_perplexity(model, shards, seq_len=32, batch_size=5, progress=False)
    assert a == b


# -- beyond the list: impossible values and bad files for every command -----------------------------------------


def _bad_files(root):
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "empty.txt").write_text("")
    (root / "manifest_only").mkdir(exist_ok=True)
    (root / "manifest_only" / "manifest.json").write_text('{"format": "finemoe-token-shards-v1"}')
    import lzma

    whole = lzma.compress(("".join(json.dumps({"text": t}) + "\n" for t in TEXTS)).encode())
    (root / "torn.jsonl.xz").write_bytes(whole[: len(whole) // 2])
    (root / "nums.jsonl").write_text('{"text": 5}\n')


BAD_INVOCATIONS = [
    (["eval", "{root}/nothing"], "no checkpoint there"),
    (["eval", "{root}/empty.pt"], "unreadable checkpoint"),
    (["eval", "{root}/text.pt"], "unreadable checkpoint"),
    (["eval", "{run}", "--split", "test"], "no 'test' split"),
    (["eval", "{run}", "--tasks", "nope"], "unknown task 'nope'"),
    (["eval", "{run}", "--tasks", "piqa", "--evals-dir", "{root}/none"], "no such eval set"),
    (["eval", "{run}", "--limit", "0"], "'--limit'"),
    (["eval", "{run}", "--device", "tpu9"], "not a device"),
    (["eval", "{run}", "--data", "{root}/manifest_only"], "damaged manifest"),
    (["eval", "{run}", "--data", "{root}/nothing"], "no manifest.json"),
    (["generate", "{root}/empty.pt"], "unreadable checkpoint"),
    (["generate", "{run}", "--max-new-tokens", "0"], "'--max-new-tokens'"),
    (["generate", "{run}", "--temperature", "-1"], "'--temperature'"),
    (["generate", "{run}", "--top-p", "0"], "--top-p"),
    (["generate", "{run}", "--top-p", "1.5"], "'--top-p'"),
    (["generate", "{run}", "--top-k", "-1"], "'--top-k'"),
    (["analyze", "{run}", "--out", "{root}/a", "--batches", "0"], "'--batches'"),
    (["analyze", "{run}", "--out", "{root}/a", "--dtype", "float8"], "--dtype"),
    (["analyze", "{run}", "--out", "{root}/a", "--labels", "x,y"], "--labels names 2 checkpoints"),
    (["info", "-c", "{root}/binary.yaml"], "not a YAML text file"),
    (["info", "-c", "{root}/list.yaml"], "must hold a mapping"),
    (["info", "-c", "no-such-preset"], "no preset 'no-such-preset'"),
    (["info", "model.d_model=-3"], "model.d_model: must be positive"),
    (["info", "model.ffn.kind=nope"], "unknown FFN kind 'nope'"),
    (["info", "model"], "an override must look like key.path=value"),
    (["smoke", "--steps", "0"], "'--steps'"),
    (["train", "--out", "{root}/t", "--data", "{root}/nothing"], "no manifest.json"),
    (["train", "--out", "{root}/t", "train.steps=0"], "train.steps: must be positive"),
    (["train", "--out", "{root}/t", "--resume", "--overwrite"], "not both"),
    (["data", "{root}/empty.txt", "-o", "{root}/d", "--vocab-size", "300"], "the corpus is empty"),
    (["data", "{root}/torn.jsonl.xz", "-o", "{root}/d", "--vocab-size", "300"], "cannot be read"),
    (["data", "{root}/nums.jsonl", "-o", "{root}/d", "--vocab-size", "300"], "'text' is int, not a string"),
    (["data", "{root}/nothing.txt", "-o", "{root}/d", "--vocab-size", "300"], "no such file"),
    (["data", "{root}/empty.txt", "-o", "{root}/d"], "give either a tokenizer file or a vocabulary size"),
    (["data", "{root}/empty.txt", "-o", "{root}/d", "--tokenizer", "{root}/text.pt"], "not a `tokenizers` JSON"),
    (["data", "{root}/empty.txt", "-o", "{root}/d", "--vocab-size", "300", "--val-fraction", "1.5"], "val_fraction"),
    (["data", "{root}/empty.txt", "-o", "{root}/d", "--vocab-size", "300", "--dtype", "int8"], "uint16 or uint32"),
    (["study", "no-such-study"], "no-such-study"),
    (["nosuch"], "No such command"),
]


@pytest.mark.parametrize("args,fragment", BAD_INVOCATIONS, ids=[" ".join(a[:3]) for a, _ in BAD_INVOCATIONS])
def test_bad_input_is_one_line_and_status_2(run, tmp_path, capsys, args, fragment):
    _bad_files(tmp_path)
    code, output = cli(capsys, *[a.format(root=tmp_path, run=run) for a in args])
    assert_one_line_error(code, output, fragment)
