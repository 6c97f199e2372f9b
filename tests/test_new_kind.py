"""A design added from outside finemoe's source: a throw-away FFN kind registered here,
with its own statistic, runs through training, `finemoe analyze` and a one-arm study
without any change to finemoe (issue 13's proof that a design is one module)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from finemoe.layers import FFN_KINDS, CallContext, FFN, FFNConfig, FFNOutput, LayerContext, Record, Stats, register_ffn
from finemoe.layers.common import RMSNorm, SwiGLU, swiglu_params
from tests.test_interop import _cli
from tests.test_study import TINY, shards  # noqa: F401  (the shards fixture)


@dataclass
class OutputGate(Record):
    """This kind's own statistic: its per-token gate, summed over tokens."""

    name: ClassVar[str] = "output_gate"
    gate_sum: Tensor
    tokens: Tensor

    def summary(self) -> dict:
        return {"output_gate": {"mean": float(self.gate_sum / self.tokens)}}

    def scalars(self) -> dict[str, float]:
        return {"gate_mean": float(self.gate_sum / self.tokens)}


@dataclass
class HalfGatedConfig(FFNConfig):
    """A dense SwiGLU whose output is scaled by a learned per-token gate in (0, 1)."""

    kind: ClassVar[str] = "test-half-gated"
    intermediate_size: int = 32

    def build(self, d_model: int, context: LayerContext | None = None) -> "HalfGatedFFN":
        return HalfGatedFFN(self, d_model)

    def num_params(self, d_model: int) -> int:
        return 2 * d_model + swiglu_params(d_model, self.intermediate_size)

    def num_active_params(self, d_model: int) -> int:
        return self.num_params(d_model)

    def flops_per_token(self, d_model: int) -> int:
        return 2 * (d_model + swiglu_params(d_model, self.intermediate_size))

    # its own dense conversion: the dense FFN's weights, and a gate that starts at 0.5
    @classmethod
    def from_dense(cls, dense, **_) -> "HalfGatedConfig":
        return cls(intermediate_size=dense.intermediate_size)

    def weights_from_dense(self, dense_sd, *, generator=None):
        return {**dense_sd, "gate.weight": torch.zeros(1, dense_sd["norm.weight"].numel())}


class HalfGatedFFN(FFN):
    def __init__(self, config: HalfGatedConfig, d_model: int):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(d_model)
        self.gate = nn.Linear(d_model, 1, bias=False)
        self.mlp = SwiGLU(d_model, config.intermediate_size)

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None, context: CallContext | None = None) -> FFNOutput:
        u = self.norm(h_BTD)
        g = torch.sigmoid(self.gate(u))
        if stats is not None:  # its own statistic
            stats.add(OutputGate(g.detach().double().sum(), torch.tensor(float(g.numel()), dtype=torch.float64)))
        return FFNOutput(update=g * self.mlp(u, stats))

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.gate.weight, std=std)
        self.mlp.init_weights(std, out_std)


@pytest.fixture
def registered():
    """The kind exists for this test only (the registry tests list finemoe's own kinds)."""
    register_ffn(HalfGatedConfig)
    yield
    FFN_KINDS.pop(HalfGatedConfig.kind)


def test_a_kind_defined_outside_finemoe_trains_is_analysed_and_studied(tmp_path, shards, registered):  # noqa: F811
    from finemoe.analysis import analyze_checkpoint
    from finemoe.study import run_study

    preset = tmp_path / "half.yaml"
    preset.write_text("base: tiny\nmodel:\n  ffn: {kind: test-half-gated, intermediate_size: 24}\n")
    study = tmp_path / "one.yaml"
    study.write_text(f"""
name: one
claim: "a design added from outside trains"
common: [data.path={shards}, train.steps=4, train.log_every=2, {", ".join(TINY)}]
arms:
  - {{name: half, preset: {preset}, analyses: [nsar]}}
""")
    table = run_study(str(study), tmp_path / "runs", progress=False)
    (row,) = table["rows"]
    assert row["run"] == "half" and row["val_perplexity"] > 1
    records = [json.loads(line) for line in (tmp_path / "runs" / "half" / "metrics.jsonl").read_text().splitlines()]
    assert any("layer0/gate_mean" in r for r in records)  # the trainer logged the layer's own statistic
    result = analyze_checkpoint(tmp_path / "runs" / "half", batches=1, batch_size=2, sources=(), progress=False)
    assert 0 < result["model"]["nsar_act"]["0.1"] <= 1  # its SwiGLU reported activations like every kind's
    assert 0 < result["layers"]["layer0"]["output_gate"]["mean"] < 1  # and its own record, summarised by itself


def test_a_kind_defined_outside_finemoe_is_a_conversion_target(tmp_path, shards, registered):  # noqa: F811
    """`finemoe convert --to KIND` and a study's `convert: KIND` reach the kind's own
    ``from_dense`` / ``weights_from_dense``; the converted model is half the dense one."""
    from finemoe.checkpoint import load_model
    from finemoe.convert import conversions
    from finemoe.study import run_study

    assert "test-half-gated" in conversions()
    study = tmp_path / "two.yaml"
    study.write_text(f"""
name: two
claim: "converted by its own rule"
common: [data.path={shards}, train.steps=2, {", ".join(TINY)}]
arms:
  - {{name: dense, preset: tiny}}
  - {{name: half, init: {{from: dense, convert: test-half-gated}}, overrides: [train.steps=2]}}
""")
    run_study(str(study), tmp_path / "runs", progress=False)
    result = _cli("convert", tmp_path / "runs" / "dense", "-o", tmp_path / "converted", "--to", "test-half-gated")
    assert result.exit_code == 0, result.output
    dense, _, _ = load_model(tmp_path / "runs" / "dense")
    half, cfg, _ = load_model(tmp_path / "converted")
    assert cfg.model.ffn.kind == "test-half-gated"
    tokens = torch.randint(0, 100, (1, 8))
    with torch.no_grad():  # every FFN update halved: the outputs differ from dense, the FFN weights do not
        assert torch.equal(half.blocks[0].ffn.mlp.up_proj.weight, dense.blocks[0].ffn.mlp.up_proj.weight)
        assert not torch.allclose(half(tokens).logits, dense(tokens).logits)
    bad = _cli("convert", tmp_path / "runs" / "dense", "-o", tmp_path / "x", "--to", "peer")
    assert bad.exit_code == 2 and "cannot be made from a dense FFN" in bad.output
