"""The ``finemoe`` command line.

Every command takes ``-c/--config`` (a preset name or a YAML path) and any number
of dotted overrides (``model.d_model=256``). A bad config ends the command with one
line naming the field and exit status 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
import sys
import time
from typing import Annotated, Callable, Optional

import typer
import yaml

from finemoe.config import to_dict
from finemoe.errors import InputError
from finemoe.run_config import DEFAULT_PRESET, RunConfig, list_presets, load_run_config

app = typer.Typer(
    name="finemoe",
    help="Build, train, convert, evaluate and analyse transformer LMs with fine-grained expert FFNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Preset name (see `finemoe presets`) or path to a YAML file.")
]
Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. model.d_model=256 model.ffn.kind=moe", show_default=False)
]


def _close_progress_bars() -> None:
    """An error must start on a line of its own, not after an open progress bar's."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _fail(message: str) -> None:
    _close_progress_bars()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def one_line_errors(command: Callable) -> Callable:
    """Bad input anywhere in a command (a config, data, checkpoint or model file; a file
    that cannot be read) ends it with one line naming the problem and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            _fail(str(err))
        except OSError as err:  # a missing, unreadable or unwritable file: the message names it
            _fail(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))

    return wrapper


def _device(spec: str) -> str:
    """'auto' → 'cuda' when available, else 'cpu'; anything else as given, if it exists here."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise typer.BadParameter(f"{spec!r} is not a device ('cpu', 'cuda', 'cuda:1' or 'auto')", param_hint="--device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("'cuda' was asked for but CUDA is not available here", param_hint="--device")
    return spec


def _load(config: str, overrides: list[str] | None) -> RunConfig:
    return load_run_config(config, overrides)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def accounting_table(cfg: RunConfig) -> str:
    m = cfg.model
    rows = [("layer", "ffn kind", "ffn params", "ffn active", "ffn FLOPs/token")]
    for i, ffn in enumerate(m.layer_ffns()):
        rows.append(
            (str(i), ffn.kind, _fmt(ffn.num_params(m.d_model)), _fmt(ffn.num_active_params(m.d_model)), _fmt(ffn.flops_per_token(m.d_model)))
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        f"total params:            {m.num_params():,} ({m.num_params(exclude_embedding=True):,} without embedding)",
        f"active params / token:   {m.num_active_params():,.0f} ({m.num_active_params(exclude_embedding=True):,.0f} without embedding)",
        f"forward FLOPs / token:   {m.flops_per_token():,.0f} at context {m.max_seq_len}",
    ]
    return "\n".join(lines)


@app.command()
def presets() -> None:
    """List the presets shipped with finemoe, with their sizes."""
    for name in list_presets():
        cfg = load_run_config(name)
        kinds = sorted({f.kind for f in cfg.model.layer_ffns()})
        typer.echo(f"{name:24s} {_fmt(cfg.model.num_params()):>8s} params  ffn: {', '.join(kinds)}")


@app.command()
@one_line_errors
def info(
    config: ConfigOption = DEFAULT_PRESET,
    overrides: Overrides = None,
    as_yaml: Annotated[bool, typer.Option("--yaml", help="Print the resolved config as YAML instead.")] = False,
) -> None:
    """Show a config's parameters and FLOPs, per layer and in total.

    Example: finemoe info -c tiny-moe model.n_layers=8
    """
    cfg = _load(config, overrides)
    if as_yaml:
        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    else:
        typer.echo(accounting_table(cfg))


@app.command()
@one_line_errors
def smoke(
    config: ConfigOption = DEFAULT_PRESET,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps on one fixed batch.")] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per batch.")] = 8,
    seq_len: Annotated[int, typer.Option(min=0, help="Tokens per sequence (default: model.max_seq_len, at most 128).")] = 0,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda' or 'auto'.")] = "auto",
    data: Annotated[Optional[str], typer.Option(help="Token shards (default: the corpus embedded in finemoe).")] = None,
) -> None:
    """Overfit one batch: checks that a model runs forward and backward and learns.

    The trainer itself runs (its loss, optimizer, clipping and statistics), on one batch
    repeated (``train.repeat_batch``) at a constant learning rate, in a temporary folder.

    Example: finemoe smoke -c tiny-moe --steps 20
    """
    import dataclasses
    import json
    import tempfile

    from finemoe.data import embedded_shards
    from finemoe.train import Trainer

    cfg = _load(config, overrides)
    T = seq_len or min(cfg.model.max_seq_len, 128)
    if T > cfg.model.max_seq_len:
        _fail(f"--seq-len {T} exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    with tempfile.TemporaryDirectory() as tmp:
        train = dataclasses.replace(
            cfg.train, steps=steps, batch_size=batch_size, grad_accum=1, seq_len=T, repeat_batch=True, lr=3e-3,
            warmup_steps=0, schedule="constant", weight_decay=0.0, eval_batches=0, final_eval=False, log_every=1,
            checkpoint_every=steps, out_dir=tmp, init_from=None, tensorboard=False, compile=False,
            device=device, keep_zero_weights=None)
        run = dataclasses.replace(cfg, train=train, data=dataclasses.replace(
            cfg.data, path=data or str(embedded_shards(progress=False))))
        trainer = Trainer(run, overwrite=True, progress=False)
        typer.echo(f"model: {cfg.model.num_params():,} params on {trainer.device}; batch {batch_size}×{T}")
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["lm_loss"], r.get("aux_loss", 0.0)) for r in records if "lm_loss" in r]
    for step, lm_loss, aux in losses:
        if (step - 1) % max(1, steps // 10) == 0 or step == steps:
            typer.echo(f"step {step:4d}  lm loss {lm_loss:.4f}  aux {aux:.4f}")
    first, last = losses[0][1], losses[-1][1]
    typer.echo(f"lm loss {first:.4f} -> {last:.4f} in {steps} steps, {steps * batch_size * T / elapsed:,.0f} tokens/s")
    if not last < first:
        typer.echo("error: the loss did not fall", err=True)
        raise typer.Exit(1)


@app.command()
@one_line_errors
def data(
    inputs: Annotated[list[str], typer.Argument(help="Files (.txt/.jsonl/.parquet, optionally .gz/.xz/.bz2/.zst) or folders.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the shards and manifest into.")],
    tokenizer: Annotated[Optional[str], typer.Option(help="A `tokenizers` JSON file.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Train a byte-level BPE of this size instead.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out (by a hash of their id).")] = 0.01,
    val_input: Annotated[Optional[list[str]], typer.Option(help="Use these inputs as the validation split instead.")] = None,
    glob: Annotated[Optional[str], typer.Option(help="Files to take from folders, e.g. '**/*.py'.")] = None,
    text_field: Annotated[str, typer.Option(help="The text field of .jsonl/.parquet records.")] = "text",
    eos_token: Annotated[Optional[str], typer.Option(help="End-of-text token separating documents.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="uint16 or uint32 (default: the smallest that fits).")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip (and count) files that are not UTF-8 instead of failing.")] = False,
    dedupe: Annotated[bool, typer.Option(help="Drop documents whose exact text was already read.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Tokenize text into memory-mapped token shards with a JSON manifest.

    Example: finemoe data ../shared/data/prose/train.jsonl.xz --val-input ../shared/data/prose/val.jsonl.xz --vocab-size 16384 -o data/prose
    """
    from finemoe.data import build_shards

    manifest = build_shards(
        inputs, out, tokenizer_path=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
        val_inputs=val_input, glob=glob, text_field=text_field, eos_token=eos_token, dtype=dtype,
        skip_invalid=skip_invalid, dedupe=dedupe, overwrite=overwrite,
    )
    for split, info in manifest["splits"].items():
        typer.echo(f"{split:5s} {info['documents']:>9,} documents {info['tokens']:>13,} tokens")
    if manifest["skipped_files"]:
        typer.echo(f"skipped {manifest['skipped_files']} invalid file(s)")
    if manifest["duplicates_dropped"]:
        typer.echo(f"dropped {manifest['duplicates_dropped']:,} duplicate document(s)")
    typer.echo(f"vocabulary {manifest['vocab_size']:,} ({manifest['dtype']}), written to {out}")
    typer.echo(f"{len(manifest['sources']):,} source file(s), {manifest['source_bytes']:,} bytes; "
               f"fingerprint {manifest['fingerprint']} ({manifest['seconds']:.0f} s)")


@app.command()
@one_line_errors
def train(
    config: ConfigOption = DEFAULT_PRESET,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest intact checkpoint in train.out_dir.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in a run folder that holds a run (deletes its checkpoints).")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (same as train.out_dir=...).")] = None,
    data_path: Annotated[Optional[str], typer.Option("--data", help="Token shards (same as data.path=...).")] = None,
) -> None:
    """Train a model (on the embedded corpus unless data.path is set), evaluate it, save it.

    Example: finemoe train -c tiny-moe train.steps=200 --out runs/my-moe
    Several GPUs: torchrun --standalone --nproc_per_node 2 -m finemoe.cli train -c s20m --data data/prose
    """
    from finemoe.train import Trainer, TrainingDiverged

    extra = list(overrides or [])
    if out:
        extra.append(f"train.out_dir={out}")
    if data_path:
        extra.append(f"data.path={data_path}")
    cfg = _load(config, extra)
    if resume and overwrite:
        raise typer.BadParameter("give --resume or --overwrite, not both", param_hint="--overwrite")
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    if trainer.is_main:
        m = cfg.model
        typer.echo(
            f"{config}: {m.num_params():,} params ({m.num_active_params():,.0f} active), "
            f"{m.flops_per_token(trainer.seq_len) / 1e6:,.1f} MFLOPs/token, on {trainer.device} × {trainer.world_size}; "
            f"{cfg.train.steps} steps -> {cfg.train.out_dir}"
        )
    try:
        summary = trainer.fit()
    except TrainingDiverged as err:
        _fail(str(err))
    finally:
        trainer.close()
    if trainer.is_main:
        final = summary["final_val"]
        if final:
            typer.echo(
                f"done: step {summary['step']}, val loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
                f"bits/byte {final['bits_per_byte']:.4f} ({final['tokens']:,} tokens)"
            )


@app.command(name="import")
@one_line_errors
def import_(
    source: Annotated[str, typer.Argument(help="A Hugging Face checkpoint folder (config.json + safetensors) or a .gguf file.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The run folder to write (must not exist).")],
    train_seq_len: Annotated[int, typer.Option(min=2, help="train.seq_len of the new run (capped at the model's context).")] = 2048,
) -> None:
    """A pretrained LLaMA-family (or Mixtral-style MoE) checkpoint → a run folder that
    eval, generate, train (train.init_from), convert, analyze and export accept.

    Example: finemoe import SmolLM2-135M-Instruct.Q4_1.gguf -o runs/smollm2
    """
    from finemoe.interop import import_hf
    from finemoe.checkpoint import load_checkpoint
    from finemoe.config import from_dict

    folder = import_hf(source, out, train_seq_len=train_seq_len)
    cfg = from_dict(RunConfig, load_checkpoint(folder)["config"])
    typer.echo(accounting_table(cfg))
    typer.echo(f"\nwrote {folder} (end tokens: {', '.join(cfg.end_tokens or ['<|endoftext|>'])}); "
               f"train on it with: finemoe train -c {folder}/config.yaml train.init_from={folder} data.path=SHARDS")


@app.command()
@one_line_errors
def convert(
    run: Annotated[str, typer.Argument(help="A run folder or checkpoint (or a HF folder / .gguf file) with dense FFNs.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The run folder to write (must not exist).")],
    to: Annotated[str, typer.Option("--to", help="dsmoe, moe (LLaMA-MoE: the same blocks, a softmax top-k router), "
                                                 "finedeep, prune (channels) or sparsegpt (one-shot weight "
                                                 "pruning).")],
    experts: Annotated[int, typer.Option(min=1, help="dsmoe / moe / finedeep: blocks n of each dense FFN.")] = 8,
    sublayers: Annotated[int, typer.Option(min=1, help="finedeep: sub-layers M (1: exactly the dense model at "
                                                       "conversion).")] = 1,
    active_share: Annotated[Optional[float], typer.Option(help="moe: k = share · n; prune: the share of channels kept; "
                                                               "sparsegpt: the share of FFN weights kept.")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="sparsegpt: n:m semi-structured sparsity (2:4 removes 2 of "
                                                        "every 4), instead of --active-share.")] = None,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="moe: experts per token (instead of --active-share).")] = None,
    threshold: Annotated[float, typer.Option(help="dsmoe: τ, a block is on where its gate exceeds it.")] = 0.5,
    straight_through: Annotated[bool, typer.Option("--ste/--no-ste", help="dsmoe: straight-through estimator.")] = True,
    sparsity_loss: Annotated[float, typer.Option(help="dsmoe: λ of the sparsity loss.")] = 1.0,
    criterion: Annotated[str, typer.Option(help="prune: activation (needs --data), magnitude or random.")] = "activation",
    data_path: Annotated[Optional[str], typer.Option("--data", help="Token shards for calibration (default: the run's data).")] = None,
    calibration_tokens: Annotated[int, typer.Option(min=1, help="prune (activation), sparsegpt: calibration tokens.")] = 65536,
    window: Annotated[int, typer.Option(min=2, help="prune (activation), sparsegpt: calibration window.")] = 512,
    seed: Annotated[int, typer.Option(min=0, help="Seed of new gates / routers and of random pruning.")] = 0,
    device: Annotated[str, typer.Option(help="Where calibration runs: 'cpu', 'cuda' or 'auto'.")] = "auto",
) -> None:
    """Convert a trained model's dense FFNs (DSMoE and its baselines, METHODS.md §2), and
    print parameters, active parameters and FLOPs before and after.

    Example: finemoe convert runs/smollm2 -o runs/smollm2-dsmoe --to dsmoe --experts 8 --threshold 0.5
    """
    import dataclasses

    from finemoe.checkpoint import check_data_compatible, load_model
    from finemoe.convert import calibration_batches, convert_model, needs_calibration, train_settings_after
    from finemoe.data import TokenShards
    from finemoe.interop import write_run_folder

    if active_share is not None and not 0 < active_share <= 1:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--active-share")
    if to == "prune" and active_share is None:
        raise typer.BadParameter("prune needs the share of channels to keep", param_hint="--active-share")
    if to == "sparsegpt" and (active_share is None) == (pattern is None):
        raise typer.BadParameter("give --active-share or --pattern", param_hint="--pattern")
    model, cfg, tokenizer = load_model(run, _device(device))
    batches = ()
    if needs_calibration(to, criterion):
        shards = TokenShards(data_path or cfg.data.path or _no_calibration_data(run))
        check_data_compatible(run, cfg.model.vocab_size, tokenizer, shards)
        batches = calibration_batches(shards, calibration_tokens, window)
    report: dict = {}
    model_cfg, sd = convert_model(model, cfg.model, to, num_experts=experts, top_k=top_k, active_share=active_share,
                                  keep_fraction=active_share,
                                  threshold=threshold, straight_through=straight_through,
                                  sparsity_loss_coef=sparsity_loss, criterion=criterion, calibration=batches,
                                  num_sublayers=sublayers, seed=seed, pattern=pattern, report=report)
    new_cfg = dataclasses.replace(cfg, model=model_cfg, train=dataclasses.replace(cfg.train, **train_settings_after(to)))
    typer.echo("before:\n" + "\n".join(accounting_table(cfg).splitlines()[-3:]))
    typer.echo("after:\n" + "\n".join(accounting_table(new_cfg).splitlines()[-3:]))
    notes = {f.conversion_note for f in model_cfg.layer_ffns() if f.conversion_note}
    for note in sorted(notes):
        typer.echo(f"({note})")
    if report:
        typer.echo(f"FFN weights nonzero: {report['nonzero_before']:,.0f} -> {report['nonzero_after']:,.0f} of "
                   f"{report['ffn_weights']:,.0f} ({report['nonzero_after'] / report['ffn_weights']:.1%}; shapes "
                   "unchanged: the zeros are stored, and train.keep_zero_weights in the new config keeps them zero "
                   "in further training)")
    folder = write_run_folder(out, {k: v.detach().cpu() for k, v in sd.items()}, new_cfg,
                              tokenizer_json=tokenizer.to_str() if tokenizer is not None else None,
                              extra={"converted_from": {"path": str(run), "to": to}})
    typer.echo(f"wrote {folder}")


def _no_calibration_data(run: str) -> str:
    raise typer.BadParameter(f"{run} names no data; pass token shards made with its tokenizer "
                             f"(`finemoe data TEXT --tokenizer RUN/tokenizer.json`)", param_hint="--data")


@app.command()
@one_line_errors
def export(
    run: Annotated[str, typer.Argument(help="A run folder or checkpoint file.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The Hugging Face folder to write (must not exist).")],
) -> None:
    """A run → a Hugging Face folder: dense → LlamaForCausalLM and moe without shared
    experts → MixtralForCausalLM (no finemoe needed to load them); every other kind →
    finemoe's model through trust_remote_code (modeling_finemoe.py; finemoe installed).

    Example: finemoe export runs/smollm2 -o hf/smollm2
    """
    from finemoe.interop import export_hf

    folder = export_hf(run, out)
    remote = ", trust_remote_code=True" if (folder / "modeling_finemoe.py").is_file() else ""
    typer.echo(f"wrote {folder}: AutoModelForCausalLM.from_pretrained({str(folder)!r}{remote})")


@app.command(name="eval")
@one_line_errors
def eval_(
    checkpoint: Annotated[str, typer.Argument(help="A run folder, a checkpoint file, or a HF folder / .gguf file.")],
    data_path: Annotated[Optional[str], typer.Option("--data", help="Token shards for perplexity (default: the run's data).")] = None,
    split: Annotated[str, typer.Option(help="Split for perplexity.")] = "val",
    perplexity: Annotated[bool, typer.Option("--perplexity/--no-perplexity", help="Compute perplexity on the split "
                                             "(skipped with a note when the default data has another tokenizer).")] = True,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Perplexity over at most this many tokens "
                                                      "(whole batches of windows, at least one; default: the whole split).")] = None,
    window: Annotated[Optional[int], typer.Option(min=2, help="Perplexity window in tokens (default: the run's "
                                                  "train.seq_len, else the model's context).")] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated zero-shot tasks, or 'none'.")] = "none",
    evals_dir: Annotated[str, typer.Option(help="Folder of the eval sets (*.jsonl.gz).")] = "../shared/data/evals",
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many examples per task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda' or 'auto'.")] = "auto",
    output: Annotated[Optional[str], typer.Option("--output", help="Also write the results as JSON here.")] = None,
) -> None:
    """Perplexity and bits per byte on a split; zero-shot multiple-choice accuracy.

    Example: finemoe eval runs/tiny --tasks piqa,arc_easy --limit 200
    """
    import json

    import torch

    from finemoe.checkpoint import check_data_compatible, load_model, same_tokenizer
    from finemoe.data import TokenShards
    from finemoe.evaluate import TASKS, evaluate_perplexity, load_task, score_task

    dev = _device(device)
    model, cfg, tokenizer = load_model(checkpoint, dev)
    seq_len = window or cfg.train.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise typer.BadParameter(f"{seq_len} is longer than the model's context ({cfg.model.max_seq_len})", param_hint="--window")
    names = [] if tasks == "none" else (list(TASKS) if tasks == "all" else tasks.split(","))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise typer.BadParameter(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}, all or none", param_hint="--tasks")
    if names and tokenizer is None:
        _fail("the checkpoint carries no tokenizer, so it cannot be scored on text tasks")
    task_rows = {name: load_task(evals_dir, name, limit) for name in names}  # a missing file fails before any work
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    results: dict = {"checkpoint": checkpoint}
    shards = None
    if perplexity:
        shards_path = data_path or cfg.data.path
        if shards_path is None:
            from finemoe.data import embedded_shards

            shards_path = embedded_shards()
        shards = TokenShards(shards_path)
        if data_path is None and cfg.data.path is None and tokenizer is not None and \
                not same_tokenizer(tokenizer, shards.tokenizer()):
            typer.echo("perplexity skipped: the model's tokenizer is not that of the default data; make shards with "
                       "`finemoe data TEXT --tokenizer RUN/tokenizer.json` and pass --data", err=True)
            shards = None
        else:
            check_data_compatible(checkpoint, cfg.model.vocab_size, tokenizer, shards)
            shards.check_window(split, seq_len, remedy="pass a shorter --window")
    with torch.no_grad(), autocast:
        if shards is not None:
            max_batches = None if max_tokens is None else max(1, max_tokens // (batch_size * seq_len))
            ppl = evaluate_perplexity(model, shards, split=split, seq_len=seq_len, batch_size=batch_size,
                                      max_batches=max_batches, device=dev)
            results["perplexity"] = {"split": split, "data": str(shards.folder), "window": seq_len} | ppl
            typer.echo(f"{split}: loss {ppl['loss']:.4f}  perplexity {ppl['perplexity']:.2f}  bits/byte "
                       f"{ppl['bits_per_byte']:.4f}  ({ppl['tokens']:,} tokens, window {seq_len})")
        for name, rows in task_rows.items():
            r = score_task(model, tokenizer, name, rows, max_len=cfg.model.max_seq_len, batch_size=batch_size,
                           device=dev, progress=True)
            results[name] = r
            norm = f"  acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else ""
            typer.echo(f"{name:14s} n={r['n']:<6d} acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}{norm}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2))


@app.command()
@one_line_errors
def generate(
    checkpoint: Annotated[str, typer.Argument(help="A run folder, a checkpoint file, or a HF folder / .gguf file.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to sample.")] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.8,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass, in (0, 1].")] = 0.95,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k most likely tokens (0: all).")] = 0,
    num_samples: Annotated[int, typer.Option(min=1, help="Independent samples.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed.")] = 0,
    eos: Annotated[Optional[list[str]], typer.Option("--eos", help="A token that ends a sample (repeatable); default: "
                                                      "the model's end tokens, else <|endoftext|>.")] = None,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda' or 'auto'.")] = "auto",
) -> None:
    """Sample continuations of a prompt (KV cache; temperature, top-k, top-p). Takes a run
    folder, a checkpoint, or a Hugging Face checkpoint folder / .gguf file directly.

    Example: finemoe generate runs/tiny -p "Call me Ishmael." --max-new-tokens 60
    """
    import torch

    from finemoe.checkpoint import load_model
    from finemoe.generate import generate as sample

    if top_p <= 0:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--top-p")
    dev = _device(device)
    model, cfg, tokenizer = load_model(checkpoint, dev)
    if tokenizer is None:
        _fail("the checkpoint carries no tokenizer")
    names = eos or cfg.end_tokens or ["<|endoftext|>"]
    end_ids = [tokenizer.token_to_id(name) for name in names]
    if eos and None in end_ids:
        raise typer.BadParameter(f"{names[end_ids.index(None)]!r} is not a token of the model's tokenizer", param_hint="--eos")
    end_ids = [i for i in end_ids if i is not None]
    ids = tokenizer.encode(prompt).ids or end_ids[:1] or [0]
    out = sample(model, torch.tensor([ids] * num_samples), max_new_tokens, temperature=temperature, top_p=top_p,
                 top_k=top_k, eos_id=end_ids, seed=seed)
    for row in out.tolist():
        typer.echo(tokenizer.decode(row[len(ids):] if not prompt else row) + "\n---")


@app.command(name="lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                 "help_option_names": []})
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness with the ``finemoe`` model class registered; every option
    goes to ``lm_eval`` (its own --help lists them).

    Example: finemoe lm-eval --model finemoe --model_args path=runs/smollm2 --tasks piqa --limit 200
    """
    try:
        import finemoe.lm_eval_harness  # noqa: F401  (registers the model class "finemoe")
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        _fail(f"lm-evaluation-harness is not installed (pip install lm_eval): {err}")
    sys.argv = ["lm_eval", *ctx.args]
    cli_evaluate()


@app.command()
@one_line_errors
def analyze(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoint files or run folders (several: compared in one figure).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the JSON and PNG files.")],
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated names for the checkpoints.")] = None,
    data_path: Annotated[Optional[str], typer.Option("--data", help="Token shards (default: each run's data).")] = None,
    batches: Annotated[int, typer.Option(min=1, help="Validation batches to stream (spread over the split).")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per batch.")] = 16,
    sources: Annotated[str, typer.Option(help="Eval sets used as extra text sources for DSMoE's per-source map.")] =
        "hellaswag,piqa,arc_easy,sciq,lambada",
    evals_dir: Annotated[str, typer.Option(help="Folder of the eval sets.")] = "../shared/data/evals",
    limit: Annotated[int, typer.Option(min=1, help="Examples per eval source.")] = 300,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda' or 'auto'.")] = "auto",
    dtype: Annotated[str, typer.Option(help="'float32', or 'bfloat16' (autocast on CUDA; values on bf16's grid).")] =
        "float32",
) -> None:
    """Activation sparsity (NSAR), expert load, DSMoE active experts, routing robustness,
    PEER/PKM usage: JSON and PNG for any checkpoint.

    Example: finemoe analyze runs/s20m runs/s20m-finedeep --labels dense,finedeep --out analysis/
    """
    import json

    from finemoe.analysis import analyze_checkpoint
    from finemoe.analysis import figures

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"{dtype!r}: must be 'float32' or 'bfloat16'", param_hint="--dtype")
    dev = _device(device)
    names = labels.split(",") if labels else [Path(c).name for c in checkpoints]
    if len(names) != len(checkpoints):
        _fail(f"--labels names {len(names)} checkpoints, but {len(checkpoints)} were given")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, ckpt in zip(names, checkpoints):
        result = analyze_checkpoint(ckpt, data_path=data_path, batches=batches, batch_size=batch_size,
                                    sources=sources.split(",") if sources else (), evals_dir=evals_dir, limit=limit,
                                    device=dev, bf16=dtype == "bfloat16")
        summaries[name] = result
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
        line = f"{name}: NSAR(act, τ=0.1) {result['model'].get('nsar_act', {}).get('0.1', float('nan')):.3f}"
        rob = result["robustness"]
        if rob.get("routed_layers"):
            line += f"; ppl {rob['perplexity']:.2f} -> {rob['perplexity_top1_disabled']:.2f} with top-1 disabled"
        typer.echo(line)
    for path in figures.write_analysis_figures(summaries, out_dir):
        typer.echo(f"wrote {path.name}")


@app.command()
@one_line_errors
def study(
    name: Annotated[Optional[str], typer.Argument(help="A study in studies/ (see --list) or a YAML path.")] = None,
    overrides: Overrides = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Study folder (default results/study_NAME/runs).")] = None,
    only: Annotated[Optional[str], typer.Option(help="Comma-separated arms to run now.")] = None,
    evals_dir: Annotated[str, typer.Option(help="Eval sets, for DSMoE's per-source analysis.")] = "../shared/data/evals",
    list_: Annotated[bool, typer.Option("--list", help="List the studies.")] = False,
    report: Annotated[bool, typer.Option(help="Train nothing: rewrite the table and figures from finished runs.")] = False,
) -> None:
    """Run (or resume) a side-by-side study: every arm on the same data, tokens, seed and
    optimizer; finished arms are skipped; writes table.md/table.json.

    Example: finemoe study cartesian --out results/study_cartesian/runs data.path=data/prose
    """
    from finemoe.study import list_studies, load_study, run_study, write_figures, write_table

    if list_ or name is None:
        for n in list_studies():
            typer.echo(f"{n:12s} {load_study(n).claim}")
        return
    folder = out or f"results/study_{name}/runs"
    if report:
        if not Path(folder).is_dir():
            raise typer.BadParameter(f"{folder}: no such study folder", param_hint="--out")
        spec = load_study(name)
        for path in write_figures(spec, Path(folder), write_table(spec, Path(folder))):
            typer.echo(f"wrote {path}")
    else:
        run_study(name, folder, extra=list(overrides or []), only=only.split(",") if only else None,
                  evals_dir=evals_dir)
    typer.echo(Path(folder, "table.md").read_text())


@app.command()
@one_line_errors
def bench(
    presets_: Annotated[str, typer.Option("--presets", "-p", help="Comma-separated presets or config files, each "
                                          "with its own overrides after '+' (NAME+key=value+...).")] = DEFAULT_PRESET,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per preset.")] = 20,
    warmup: Annotated[int, typer.Option(min=2, help="Steps before timing (the first compiles).")] = 5,
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="train.compile for every preset.")] = True,
    data_path: Annotated[Optional[str], typer.Option("--data", help="Token shards (default: the embedded corpus).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write OUT.md and OUT.json.")] = None,
    profile: Annotated[bool, typer.Option(help="Also profile 3 steps per preset: top kernels (OUT.PRESET.profile.txt).")] = False,
) -> None:
    """Training speed of presets side by side in one process: tokens/s, MFU, step-time
    spread, peak memory, first-step (compile) time, recompiles and graph breaks. A preset
    may carry its own overrides after "+": -p s120m-peer,s120m-peer+train.row_sparse_updates=true

    Example: finemoe bench -p s120m,s120m-moe --steps 30 --out results/bench_h100 train.batch_size=32
    """
    import json
    import re

    from finemoe.bench import bench_markdown, bench_preset, rows_as_dicts
    from finemoe.environment import git_commit

    extra = list(overrides or []) + [f"train.compile={str(compile_).lower()}"]
    if data_path:
        extra.append(f"data.path={data_path}")
    rows = []
    for preset in presets_.split(","):
        # "NAME+key=value+...": the preset with its own overrides (e.g. an option on and off, side by side)
        name, *own = preset.split("+")
        row = bench_preset(name, steps=steps, warmup=warmup, overrides=extra + own, profile=profile)
        row.preset = preset
        rows.append(row)
        if row.profile:
            typer.echo(f"== {preset}\n{row.profile}")
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                stem = re.sub(r"[^A-Za-z0-9._-]", "_", "+".join([Path(name).stem, *own]))
                Path(f"{out}.{stem}.profile.txt").write_text(row.profile)
        mfu = f", MFU {row.mfu:.1%}" if row.mfu is not None else ""
        typer.echo(f"{preset}: {row.tokens_per_s:,.0f} tokens/s{mfu}, first step {row.first_step_s:.1f} s, "
                   f"{row.recompiles_after_warmup} recompiles after warm-up, {row.graph_breaks} graph breaks", err=True)
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    header = {"hardware": device, "commit": git_commit(), "command": " ".join(["finemoe"] + sys.argv[1:]),
              "steps": steps, "warmup": warmup}
    table = bench_markdown(rows, header)
    typer.echo(table)
    if out:
        stem = Path(out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(header | {"rows": [r | {"profile": None} for r in rows_as_dicts(rows)]},
                                                        indent=1))
        stem.with_suffix(".md").write_text(table)


def main(argv: list[str] | None = None) -> int:
    """The console script: every error on the way in (a bad option, a bad file) is one
    line and exit status 2; an unexpected exception is one line and status 1, with the
    traceback when ``FINEMOE_DEBUG=1``."""
    import os

    try:
        result = app(args=argv, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except Exception as err:
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):  # a usage error of click (typer's own or not)
            _close_progress_bars()
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {err.format_message()}{hint}", err=True)
            return err.exit_code
        if os.environ.get("FINEMOE_DEBUG"):
            raise
        _close_progress_bars()
        first_line = (str(err).splitlines() or [""])[0]
        typer.echo(f"error: {type(err).__name__}: {first_line} (an internal error of finemoe; "
                   "FINEMOE_DEBUG=1 shows the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
