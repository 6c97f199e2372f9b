"""Training: exact resume, atomic checkpoints, divergence handling, schedules, and the
train → eval → generate path of the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from finemoe.checkpoint import CheckpointError, load_checkpoint
from finemoe.config import ConfigError
from finemoe.data import build_shards
from finemoe.run_config import load_run_config
from finemoe.train import Trainer, TrainConfig, TrainingDiverged, lr_at

TEXTS = [f"Line {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40 + i % 13)) for i in range(120)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    src = folder / "corpus.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    build_shards([src], folder / "shards", vocab_size=320, val_fraction=0.1, progress=False)
    return folder / "shards"


def _config(shards, out_dir, *extra, preset="tiny"):
    return load_run_config(preset, [
        f"data.path={shards}", f"train.out_dir={out_dir}", "model.vocab_size=320", "model.d_model=32",
        "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2", "model.max_seq_len=32", "train.seq_len=32",
        "train.batch_size=4", "train.steps=8", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=4",
        "train.eval_batches=2", "train.checkpoint_every=4", "train.tensorboard=false", *extra,
    ])


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm_loss"] for r in rows if "lm_loss" in r}


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-dsmoe"])
def test_resume_reproduces_an_uninterrupted_run_exactly(shards, tmp_path, monkeypatch, preset):
    extra = ["model.ffn_layers.0.ffn.expert_intermediate_size=16"] if preset == "tiny-moe" else []
    full = Trainer(_config(shards, tmp_path / "full", *extra, preset=preset), progress=False)
    full.fit()

    # A run that dies right after its step-4 checkpoint, then is resumed.
    real_save = Trainer.save

    def save_then_die(self):
        path = real_save(self)
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(shards, tmp_path / "split", *extra, preset=preset), progress=False).fit()
    monkeypatch.setattr(Trainer, "save", real_save)
    resumed = Trainer(_config(shards, tmp_path / "split", *extra, preset=preset), resume=True, progress=False)
    assert resumed.step == 4
    resumed.fit()

    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-for-bit the same loss sequence
    a = load_checkpoint(tmp_path / "full")["model"]
    b = load_checkpoint(tmp_path / "split")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_between_checkpoints_logs_each_step_once(shards, tmp_path, monkeypatch):
    """Killed at step 6 (checkpoint at 4): the resumed run drops the records of steps 5-6
    it will log again, so metrics.jsonl reads like the uninterrupted run's."""
    Trainer(_config(shards, tmp_path / "full"), progress=False).fit()
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(shards, tmp_path / "split"), progress=False).fit()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 6  # steps 5 and 6 were logged before the kill
    Trainer(_config(shards, tmp_path / "split"), resume=True, progress=False).fit()

    def records(folder):
        return [(r["step"], sorted(k for k in r if k not in ("tokens_per_s", "mfu")))
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert records(tmp_path / "split") == records(tmp_path / "full")
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    # A fresh (not resumed) run never writes over a run's history unless asked to...
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        Trainer(_config(shards, tmp_path / "split"), progress=False)
    # ...and then starts a new log.
    Trainer(_config(shards, tmp_path / "split"), overwrite=True, progress=False).fit()
    assert records(tmp_path / "split") == records(tmp_path / "full")


def test_init_from_seeds_a_fresh_run_and_a_resume_keeps_its_own_weights(shards, tmp_path):
    source = Trainer(_config(shards, tmp_path / "source"), progress=False)
    source.fit()
    weights = load_checkpoint(tmp_path / "source")["model"]
    # resume=True with no checkpoint yet (a study arm's first start) still loads init_from
    seeded = Trainer(_config(shards, tmp_path / "seeded", f"train.init_from={tmp_path / 'source'}", "train.steps=4"),
                     resume=True, progress=False)
    assert all(torch.equal(seeded.model.state_dict()[k].cpu(), weights[k]) for k in weights)
    seeded.fit()
    own = load_checkpoint(tmp_path / "seeded")["model"]
    again = Trainer(_config(shards, tmp_path / "seeded", f"train.init_from={tmp_path / 'source'}", "train.steps=8"),
                    resume=True, progress=False)
    assert again.step == 4 and all(torch.equal(again.model.state_dict()[k].cpu(), own[k]) for k in own)
    with pytest.raises(CheckpointError, match="model config differs"):
        Trainer(_config(shards, tmp_path / "x", f"train.init_from={tmp_path / 'source'}", "model.d_model=48"),
                progress=False)


def test_a_checkpoint_of_the_earlier_expert_layout_seeds_a_run_but_does_not_resume(shards, tmp_path):
    """A checkpoint written when the expert bank kept ``w_gate`` and ``w_up`` apart: its
    weights load (``train.init_from``), its optimizer state (one tensor more) is refused
    with a one-line error instead of a stack trace from inside the optimizer."""
    extra = ("model.ffn_layers.0.ffn.expert_intermediate_size=16", "train.steps=4")
    Trainer(_config(shards, tmp_path / "old", *extra, preset="tiny-moe"), progress=False).fit()
    state = load_checkpoint(tmp_path / "old")
    model = {}
    for key, value in state["model"].items():  # rewritten in the earlier layout
        if key.endswith("experts.w_gate_up"):
            stem = key[:-len("_gate_up")]
            model[stem + "_gate"], model[stem + "_up"] = value[..., 0::2].clone(), value[..., 1::2].clone()
        else:
            model[key] = value
    state["model"] = model
    state["optimizer"]["param_groups"][0]["params"].append(max(state["optimizer"]["state"]) + 1)
    path = state.pop("path")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="optimizer state does not fit this model's parameters"):
        Trainer(_config(shards, tmp_path / "old", *extra, "train.steps=8", preset="tiny-moe"), resume=True,
                progress=False)
    seeded = Trainer(_config(shards, tmp_path / "new", *extra, f"train.init_from={tmp_path / 'old'}",
                             preset="tiny-moe"), progress=False)
    for key, value in seeded.model.state_dict().items():
        if key.endswith("experts.w_gate_up"):
            gate_key = key[:-len("_gate_up")] + "_gate"
            torch.testing.assert_close(value[..., 0::2].cpu(), model[gate_key], rtol=0, atol=0)


def test_keep_zero_weights_keeps_a_pruned_mask_through_training(shards, tmp_path):
    source = Trainer(_config(shards, tmp_path / "source", "train.steps=2", "train.warmup_steps=0"), progress=False)
    source.fit()
    state = load_checkpoint(tmp_path / "source")
    generator = torch.Generator().manual_seed(0)
    pruned = {k: v.clone() for k, v in state["model"].items()}
    for k, v in pruned.items():  # half the FFN weights zeroed at random, as a one-shot pruning leaves them
        if ".ffn.mlp." in k:
            v[torch.rand(v.shape, generator=generator) < 0.5] = 0
    torch.save({**state, "model": pruned}, tmp_path / "pruned.pt")

    def trained(*extra):
        out = tmp_path / f"run{len(extra)}"
        Trainer(_config(shards, out, f"train.init_from={tmp_path / 'pruned.pt'}", "train.steps=3",
                        "train.warmup_steps=0", *extra), progress=False).fit()
        return load_checkpoint(out)["model"]

    kept = trained("train.keep_zero_weights=blocks.*.ffn.mlp.*")
    filled = trained()
    for k, v in pruned.items():
        if ".ffn.mlp." in k:
            zero = v == 0
            assert torch.all(kept[k][zero] == 0) and torch.all(kept[k][~zero] != v[~zero])
            assert torch.all(filled[k][zero] != 0)  # plain training fills them again
        elif k.endswith("q_proj.weight"):  # not named by the glob: trained as usual
            assert torch.all(kept[k] != v)
    with pytest.raises(ConfigError, match="keep_zero_weights.*matches no parameter"):
        Trainer(_config(shards, tmp_path / "bad", "train.keep_zero_weights=nothing.*"), progress=False)


def test_a_kill_during_a_save_leaves_the_latest_checkpoint_readable(shards, tmp_path, monkeypatch):
    import finemoe.checkpoint as ckpt

    real_save = torch.save
    calls = {"n": 0}

    def torn_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half of it, then die
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(shards, tmp_path / "run"), progress=False).fit()
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "latest", "step_0000004.pt"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    trainer = Trainer(_config(shards, tmp_path / "run", "train.checkpoint_every=2"), progress=False)
    real_forward = trainer.forward

    def poisoned(inputs, targets, **kw):
        out = real_forward(inputs, targets, **kw)
        if trainer.step == 5:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 5.*step_0000004.pt"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run")["step"] == 4


def test_vocabulary_smaller_than_the_data_is_a_config_error(shards, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the data's vocabulary"):
        Trainer(_config(shards, tmp_path / "r", "model.vocab_size=100"), progress=False)


def test_missing_or_corrupt_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(bad)


def test_learning_rate_schedules():
    cos = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == pytest.approx(1.0)
    assert lr_at(55, cos) == pytest.approx(0.55)  # half-way through the cosine: the mean of 1 and 0.1
    assert lr_at(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, wsd) == 1.0 and lr_at(99, wsd) == pytest.approx(0.0) and lr_at(89, wsd) == pytest.approx(0.5)


def test_cli_train_eval_generate(shards, tmp_path):
    from typer.testing import CliRunner

    from finemoe.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "-c", "tiny", "--data", str(shards), "--out", str(out), "model.vocab_size=320", "model.d_model=32",
            "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2", "train.steps=6", "train.seq_len=32",
            "train.batch_size=4", "train.warmup_steps=1", "train.eval_batches=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6 and summary["final_val"]["perplexity"] > 1
    for name in ("config.yaml", "environment.json", "metrics.jsonl"):
        assert (out / name).is_file()
    result = runner.invoke(app, ["eval", str(out), "--device", "cpu", "--output", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["loss"] == pytest.approx(
        summary["final_val"]["loss"], rel=1e-5)
    result = runner.invoke(app, ["generate", str(out), "-p", "Line 3:", "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Line 3:")
    result = runner.invoke(app, ["eval", str(tmp_path / "nothing"), "--device", "cpu"])
    assert result.exit_code == 2 and "no checkpoint there" in result.output


def _run_torchrun(nproc, shards, out_dir, batch_size, parallel, preset="tiny", extra=()):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "finemoe.cli", "train", "-c", preset, "--data", str(shards), "--out", str(out_dir), *extra,
            "model.vocab_size=320", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=2",
            "train.seq_len=32", f"train.batch_size={batch_size}", "train.steps=6", "train.warmup_steps=1",
            "train.log_every=1", "train.eval_batches=1", "train.device=cpu", "train.tensorboard=false",
            f"train.parallel={parallel}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(out_dir)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_follow_the_one_process_loss_curve(shards, tmp_path, parallel):
    """torchrun with 2 CPU processes (gloo) and batch B each == 1 process with batch 2B."""
    one = _run_torchrun(1, shards, tmp_path / "one", 4, parallel)
    two = _run_torchrun(2, shards, tmp_path / "two", 2, parallel)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-5), step


def test_gradient_accumulation_sees_the_same_global_batch(shards, tmp_path):
    """batch 4 × accumulation 1 and batch 2 × accumulation 2 train on the same windows,
    so their loss curves agree to float32 rounding."""
    a = Trainer(_config(shards, tmp_path / "a", "train.batch_size=4"), progress=False)
    b = Trainer(_config(shards, tmp_path / "b", "train.batch_size=2", "train.grad_accum=2"), progress=False)
    assert torch.equal(torch.cat([a.batch(3, 0)[0]]), torch.cat([b.batch(3, 0)[0], b.batch(3, 1)[0]]))
    a.fit()
    b.fit()
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=2e-5)


MOE_SMALL = ["model.ffn_layers.0.ffn.expert_intermediate_size=16"]


def test_gradient_accumulation_with_moe_matches_one_big_batch(shards, tmp_path):
    """With an MoE model each micro-batch's load-balancing loss is computed on its own
    tokens (as each process's is under data parallelism), so batch 2 × accumulation 2
    equals batch 4 up to that term: the curves agree to a tolerance, not to rounding."""
    a = Trainer(_config(shards, tmp_path / "a", "train.batch_size=4", *MOE_SMALL, preset="tiny-moe"), progress=False)
    b = Trainer(_config(shards, tmp_path / "b", "train.batch_size=2", "train.grad_accum=2", *MOE_SMALL,
                        preset="tiny-moe"), progress=False)
    a.fit()
    b.fit()
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=2e-3), step
    assert any(lb[step] != la[step] for step in la)  # the per-micro-batch balancing loss does differ


def test_two_processes_with_moe_follow_the_one_process_loss_curve(shards, tmp_path):
    one = _run_torchrun(1, shards, tmp_path / "one", 4, "ddp", preset="tiny-moe", extra=MOE_SMALL)
    two = _run_torchrun(2, shards, tmp_path / "two", 2, "ddp", preset="tiny-moe", extra=MOE_SMALL)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-3), step


def test_repeat_batch_trains_every_step_on_the_first_batch(shards, tmp_path):
    """``train.repeat_batch`` (``finemoe smoke``): the same windows at every step; without
    it, each step draws its own."""
    repeated = Trainer(_config(shards, tmp_path / "a", "train.repeat_batch=true"), progress=False)
    plain = Trainer(_config(shards, tmp_path / "b"), progress=False)
    first = repeated.batch(0, 0)[0]
    assert torch.equal(repeated.batch(3, 0)[0], first)
    assert torch.equal(plain.batch(0, 0)[0], first)  # step 0's batch is the same either way
    assert not torch.equal(plain.batch(3, 0)[0], first)


def test_training_collects_garbage_on_schedule_and_restores_the_collector(shards, tmp_path, monkeypatch):
    """With ``gc_every`` the automatic collector is off while ``fit`` runs and the young
    generations are collected every ``gc_every`` steps; afterwards the collector is as it
    was. ``gc_every=0`` leaves it on."""
    import gc

    states, collections = [], []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation) or real_collect(generation))
    trainer = Trainer(_config(shards, tmp_path / "run", "train.steps=7", "train.gc_every=3"), progress=False)
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: states.append(gc.isenabled()) or step(*a, **kw))
    assert gc.isenabled()
    trainer.fit()
    assert gc.isenabled() and states == [False] * 7
    assert collections.count(1) == 2  # after steps 3 and 6
    trainer = Trainer(_config(shards, tmp_path / "off", "train.steps=3", "train.gc_every=0"), progress=False)
    step = trainer.train_step
    states.clear()
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: states.append(gc.isenabled()) or step(*a, **kw))
    trainer.fit()
    assert states == [True] * 3
