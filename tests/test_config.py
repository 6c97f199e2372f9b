"""Configs: typed parsing, one-line errors naming the field, overrides, presets, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from finemoe import ConfigError, ModelConfig, from_dict, to_dict
from finemoe.config import apply_overrides, parse_override_value
from finemoe.run_config import RunConfig, list_presets, load_run_config


@pytest.mark.parametrize(
    "data,field,words",
    [
        ({"model": {"d_modle": 64}}, "model.d_modle", "did you mean 'd_model'"),
        ({"model": {"n_layers": "four"}}, "model.n_layers", "must be an integer"),
        ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings", "true or false"),
        ({"model": {"ffn": {"kind": "moe", "num_experts": 4, "num_experts_per_tok": 5}}},
         "model.ffn.num_experts_per_tok", "larger than num_experts (4)"),
        ({"model": {"ffn": {"kind": "moe", "routing": "random"}}}, "model.ffn.routing", "must be one of"),
        ({"model": {"ffn": {"kind": "moe", "expert_intermediate_size": 30, "granularity": 4}}},
         "model.ffn.granularity", "not divisible"),
        ({"model": {"ffn": {"kind": "mystery"}}}, "model.ffn.kind", "unknown FFN kind"),
        ({"model": {"ffn": {"intermediate_size": 8}}}, "model.ffn", "needs a `kind`"),
        ({"model": {"d_model": 100, "n_heads": 3}}, "model.n_heads", "not divisible"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads", "multiple"),
        ({"model": {"ffn_layers": [{"layers": "1::2", "ffn": {"kind": "dense", "intermediate_size": -1}}]}},
         "model.ffn_layers[0].ffn.intermediate_size", "must be positive"),
        ({"model": {"ffn_layers": [{"layers": "sometimes", "ffn": {"kind": "dense"}}]}},
         "model.ffn_layers[0].layers", "not a layer selection"),
        ({"seed": -1}, "seed", ">= 0"),
    ],
)
def test_bad_configs_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    assert info.value.field == field
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_numbers_in_yaml_forms():
    cfg = from_dict(ModelConfig, {"rope_theta": "1e4", "init_std": 2, "d_model": 64.0})
    assert cfg.rope_theta == 1e4 and cfg.init_std == 2.0 and cfg.d_model == 64


def test_overrides():
    data = {"model": {"ffn": {"kind": "dense"}, "ffn_layers": [{"layers": "all", "ffn": {"kind": "moe"}}]}}
    apply_overrides(data, ["model.d_model=64", "model.ffn_layers.0.ffn.num_experts=16", "model.new.deep=3e-4"])
    assert data["model"]["d_model"] == 64
    assert data["model"]["ffn_layers"][0]["ffn"]["num_experts"] == 16
    assert data["model"]["new"]["deep"] == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(data, ["model.d_model"])
    with pytest.raises(ConfigError, match="no list element 5"):
        apply_overrides(data, ["model.ffn_layers.5.ffn.kind=dense"])


@pytest.mark.parametrize("text,value", [("8", 8), ("3e-4", 3e-4), ("true", True), ("moe", "moe"), ("[1, 3]", [1, 3]), ("1::2", "1::2")])
def test_parse_override_value(text, value):
    assert parse_override_value(text) == value


@pytest.mark.parametrize("name", list_presets())
def test_presets_round_trip(name):
    cfg = load_run_config(name)
    again = from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "finemoe.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_lists_subcommands():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("info", "presets", "smoke"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["info", "presets", "smoke"])
def test_cli_subcommand_help(command):
    assert _cli(command, "--help").returncode == 0


@pytest.mark.parametrize(
    "args,field",
    [
        (["model.ffn_layers.0.ffn.num_experts_per_tok=99"], "model.ffn_layers[0].ffn.num_experts_per_tok"),
        (["model.d_modl=3"], "model.d_modl"),
        (["model.n_layers=two"], "model.n_layers"),
    ],
)
def test_cli_bad_config_is_one_line(args, field):
    result = _cli("info", "-c", "tiny-moe", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {field}:")


def test_cli_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    result = _cli("info", "-c", str(path))
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_info_reports_accounting():
    result = _cli("info", "-c", "tiny-moe")
    assert result.returncode == 0
    cfg = load_run_config("tiny-moe")
    assert f"{cfg.model.num_params():,}" in result.stdout


@pytest.mark.parametrize("preset", [p for p in list_presets() if p.startswith("tiny")])
def test_cli_smoke_runs_every_tiny_preset_and_loss_falls(preset):
    from typer.testing import CliRunner

    from finemoe.cli import app

    result = CliRunner().invoke(app, ["smoke", "-c", preset, "--steps", "6", "--batch-size", "2", "--seq-len", "16",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first, last = result.output.strip().splitlines()[-1].split("lm loss ")[1].split(" in ")[0].split(" -> ")
    assert float(last) < float(first)


@pytest.mark.parametrize("size", ["s20m", "s50m", "s120m"])
def test_gpu_presets_are_the_pairs_they_claim(size):
    """finedeep/dsmoe: the dense model's params and FLOPs (within 1%); moe, moe-fine and
    cartesian: equal total and active params and FLOPs (within 0.1%)."""
    def model(name):
        return load_run_config(name).model

    dense = model(size)
    for variant in ("finedeep", "dsmoe"):
        m = model(f"{size}-{variant}")
        assert m.num_params() == pytest.approx(dense.num_params(), rel=0.01)
        assert m.flops_per_token() == pytest.approx(dense.flops_per_token(), rel=0.01)
    routed = [model(f"{size}-{v}") for v in ("moe", "moe-fine", "cartesian")]
    for m in routed[1:]:
        assert m.num_params() == pytest.approx(routed[0].num_params(), rel=1e-3)
        assert m.num_active_params() == pytest.approx(routed[0].num_active_params(), rel=1e-3)
        assert m.flops_per_token() == pytest.approx(routed[0].flops_per_token(), rel=1e-3)
    assert routed[0].num_active_params() < routed[0].num_params()
    for variant in ("peer", "pkm"):
        kinds = [f.kind for f in model(f"{size}-{variant}").layer_ffns()]
        assert kinds.count(variant) == 1 and kinds.index(variant) == len(kinds) // 2
