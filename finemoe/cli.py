"""The ``finemoe`` command line.

Every command takes ``-c/--config`` (a preset name or a YAML path) and any number
of dotted overrides (``model.d_model=256``). A bad config ends the command with one
line naming the field and exit status 2.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Annotated, Callable, Optional

import typer
import yaml

from finemoe.config import ConfigError, to_dict
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


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def config_errors_as_messages(command: Callable) -> Callable:
    """Turn a ConfigError anywhere in a command into one line and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            _fail(str(err))

    return wrapper


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
@config_errors_as_messages
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
@config_errors_as_messages
def smoke(
    config: ConfigOption = DEFAULT_PRESET,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps on one fixed random batch.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (default: model.max_seq_len, at most 128).")] = 0,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda' or 'auto'.")] = "auto",
) -> None:
    """Build a model and overfit one random batch: checks that it runs forward and
    backward and that its loss falls.

    Example: finemoe smoke -c tiny-moe --steps 20
    """
    import torch

    from finemoe.model import Transformer

    cfg = _load(config, overrides)
    if steps < 1 or batch_size < 1 or seq_len < 0:
        _fail("--steps and --batch-size must be >= 1 and --seq-len >= 0")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).to(dev)
    T = seq_len or min(cfg.model.max_seq_len, 128)
    if T > cfg.model.max_seq_len:
        _fail(f"--seq-len {T} exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, T + 1), device=dev)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    typer.echo(f"model: {model.num_params():,} params on {dev}; batch {batch_size}×{T}")
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(steps):
        out = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        last = out.lm_loss.item()
        if step == 0:
            first = last
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            typer.echo(f"step {step:4d}  lm loss {last:.4f}  aux {out.aux_loss.item():.4f}")
    elapsed = time.perf_counter() - start
    typer.echo(f"lm loss {first:.4f} -> {last:.4f} in {steps} steps, {steps * batch_size * T / elapsed:,.0f} tokens/s")
    if not last < first:
        typer.echo("error: the loss did not fall", err=True)
        raise typer.Exit(1)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
