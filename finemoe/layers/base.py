"""The FFN interface every design implements, and the registry of FFN kinds.

A transformer block calls its FFN on the residual stream ``h`` (after attention)
and adds what comes back::

    out = block.ffn(h)          # FFNOutput
    h = h + out.update

The FFN owns its pre-norm (and any inner norms and residuals), so designs that stack
several normalised sub-layers inside one block (Finedeep, CartesianMoE) use the same
interface as a plain pre-norm SwiGLU, with no special case in the model.

A design is added by writing a config dataclass decorated with ``@register_ffn`` and a
module subclassing ``FFN``; nothing else in finemoe changes.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from finemoe.config import ConfigError
from finemoe.layers.records import Stats

__all__ = ["CallContext", "FFN", "FFNConfig", "FFNOutput", "FFN_KINDS", "LayerContext", "Stats", "intervention", "register_ffn"]


# kind name -> config class
FFN_KINDS: dict[str, type["FFNConfig"]] = {}


def register_ffn(cls: type["FFNConfig"]) -> type["FFNConfig"]:
    """Class decorator: make a config selectable as ``ffn: {kind: <cls.kind>, ...}``."""
    if not isinstance(getattr(cls, "kind", None), str):
        raise TypeError(f"{cls.__name__} must define a class attribute `kind: ClassVar[str]`")
    if cls.kind in FFN_KINDS and FFN_KINDS[cls.kind] is not cls:
        raise TypeError(f"FFN kind {cls.kind!r} is registered twice")
    FFN_KINDS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class LayerContext:
    """Where an FFN sits in the model, for designs whose losses are averaged over the
    layers of their kind (DSMoE's sparsity loss is ``1/(L·n) Σ_layers Σ_i G(a_i)``)."""

    layer_idx: int = 0
    n_layers: int = 1
    n_layers_of_kind: int = 1
    """How many layers of the model use this FFN kind."""


@dataclass(frozen=True)
class CallContext:
    """What an FFN may read about the current call besides the hidden states; any layer
    may use it, none has to. ``token_ids``: ``(B, T)`` ids of the tokens whose hidden
    states these are (the Hash layer routes by them)."""

    token_ids: Tensor | None = None


@dataclass
class FFNOutput:
    """What an FFN returns to its block.

    update: ``(B, T, D)``, added to the residual stream by the block.
    aux_losses: named auxiliary losses, *already multiplied by their coefficients*;
        the model sums them over layers into ``aux_loss``.

    Statistics do not travel here: a caller that wants them passes a ``Stats`` to the
    forward, and the layer adds typed records to it (``finemoe.layers.records``).
    """

    update: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FFNConfig:
    """Base class of every FFN kind's config.

    Subclasses set ``kind`` and implement the accounting methods below. Accounting
    conventions (shared by all kinds, so that comparisons are fair):

    - ``num_params``: every parameter of the layer, norms and routers included.
    - ``num_active_params``: the parameters a single token's forward pass touches
      (for data-dependent designs, the configured maximum; measured values come from
      the analysis tools).
    - ``flops_per_token``: forward FLOPs of the layer for one token, counted as
      2 × multiply-accumulates of every matrix product and weighted sum.
      Element-wise work (activations, norms, softmax, top-k) is not counted.
    """

    kind: ClassVar[str] = ""

    # -- polymorphic construction -------------------------------------------------
    @classmethod
    def resolve_subclass(cls, data: dict[str, Any], path: str) -> tuple[type, dict[str, Any]]:
        if cls is not FFNConfig:  # a concrete kind was asked for directly
            data = dict(data)
            given = data.pop("kind", cls.kind)
            if given != cls.kind:
                raise ConfigError(f"{path}.kind" if path else "kind", f"expected {cls.kind!r}, got {given!r}")
            return cls, cls.upgrade(data, path)
        if "kind" not in data:
            raise ConfigError(path, f"an FFN config needs a `kind`, one of: {', '.join(sorted(FFN_KINDS))}")
        data = dict(data)
        kind = data.pop("kind")
        if kind not in FFN_KINDS:
            raise ConfigError(
                f"{path}.kind" if path else "kind",
                f"unknown FFN kind {kind!r}; known kinds: {', '.join(sorted(FFN_KINDS))}",
            )
        return FFN_KINDS[kind], FFN_KINDS[kind].upgrade(data, path)

    @classmethod
    def upgrade(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        """A kind's chance to rewrite its raw config (shorthands, fields of older
        versions) before it is checked and built; by default unchanged."""
        return data

    # -- to be implemented by every kind ------------------------------------------
    def build(self, d_model: int, context: LayerContext | None = None) -> "FFN":
        """The module; ``context`` defaults to a model of one layer."""
        raise NotImplementedError

    def num_params(self, d_model: int) -> int:
        raise NotImplementedError

    def num_active_params(self, d_model: int) -> float:
        raise NotImplementedError

    def flops_per_token(self, d_model: int) -> float:
        raise NotImplementedError

    @property
    def couples_tokens(self) -> bool:
        """Whether a token's output depends on the other tokens of its batch (expert-choice
        routing: experts pick among all of them). Evaluation then runs one sequence at a
        time, so that scores do not depend on the batch size or on padding."""
        return False

    def replace(self, **changes: Any) -> "FFNConfig":
        return dataclasses.replace(self, **changes)

    # -- what tokens actually used (``finemoe analyze``) ----------------------------------------
    def measured_active_share(self, layer_summary: dict) -> float | None:
        """For designs whose activation is learned per token (DSMoE's gates): the share of
        the layer's blocks that tokens switched on, read from its analysis summary (its records' summaries); None
        for designs that spend what their config says."""
        return None

    @classmethod
    def measures_active_share(cls) -> bool:
        return cls.measured_active_share is not FFNConfig.measured_active_share

    def measured_cost(self, layer_summary: dict, d_model: int) -> tuple[float, float]:
        """Active parameters and forward FLOPs per token as measured (by default as
        configured)."""
        return self.num_active_params(d_model), self.flops_per_token(d_model)

    # -- made from a dense FFN (DSMoE and its baselines, METHODS.md §2) --------------------
    @property
    def is_plain_swiglu(self) -> bool:
        """Whether the layer is one pre-norm SwiGLU MLP of width ``intermediate_size``
        (state dict ``norm.weight``, ``mlp.{gate,up,down}_proj.weight``; module ``.mlp``):
        what conversions start from, and what channel pruning and SparseGPT prune."""
        return False

    conversion_note: ClassVar[str] = ""
    """What ``finemoe convert`` tells the user after converting to this kind."""

    @classmethod
    def converts_from_dense(cls) -> bool:
        """Whether this kind can be made from a trained dense SwiGLU FFN."""
        return cls.from_dense.__func__ is not FFNConfig.from_dense.__func__

    @classmethod
    def from_dense(cls, dense: Any, *, num_experts: int = 8, top_k: int | None = None,
                   active_share: float | None = None, **options: Any) -> "FFNConfig":
        """This kind's config for a layer made from the dense SwiGLU FFN ``dense``
        (a ``DenseConfig``): ``num_experts`` blocks of its hidden units, and whichever of
        ``top_k``, ``active_share`` and the kind's own ``options`` (e.g. DSMoE's
        ``threshold``) the kind takes; it ignores the others. Kinds that cannot be made
        from a dense FFN keep this default."""
        raise ConfigError("convert", f"a {cls.kind!r} FFN cannot be made from a dense FFN")

    def weights_from_dense(self, dense_sd: dict[str, Tensor], *, generator: torch.Generator | None = None
                           ) -> dict[str, Tensor]:
        """This layer's state dict made from a dense FFN's (``DenseFFN`` keys:
        ``norm.weight``, ``mlp.{gate,up,down}_proj.weight``); new parameters (gates,
        routers) drawn with ``generator``."""
        raise ConfigError("convert", f"a {self.kind!r} FFN cannot be made from a dense FFN")


    # -- the FFN of a transformers architecture (``finemoe import`` / ``export``) -----------
    hf_model_type: ClassVar[str] = ""
    """The transformers ``model_type`` whose every FFN is of this kind (``llama``: dense,
    ``mixtral``: moe); empty for kinds with no such architecture (exported with remote
    code instead)."""
    hf_architecture: ClassVar[str] = ""
    """Its model class, e.g. ``LlamaForCausalLM``."""
    hf_config_fields: ClassVar[frozenset[str]] = frozenset()
    """The FFN fields of its ``config.json`` this kind reads (besides ``intermediate_size``)."""

    @classmethod
    def from_hf_config(cls, fields: dict[str, Any], norm_eps: float) -> "FFNConfig":
        """This kind's config from the fields of a ``config.json`` of ``hf_model_type``."""
        raise ConfigError("model_type", f"a {cls.kind!r} FFN has no transformers architecture")

    def hf_export_problem(self) -> str | None:
        """Why this layer does not compute what its architecture's FFN computes (an option
        the architecture lacks), or None when it does."""
        return f"a {self.kind!r} FFN has no transformers architecture"

    def hf_config(self) -> dict[str, Any]:
        """The FFN fields of the architecture's ``config.json`` (equal for every layer of an
        exported model)."""
        raise NotImplementedError

    def weights_from_hf(self, hf_sd: Any, prefix: str) -> dict[str, Tensor]:
        """This layer's state dict from the architecture's checkpoint, whose keys of this
        transformer layer start with ``prefix`` (``model.layers.3.``); the post-attention
        norm there is the FFN's pre-norm."""
        raise NotImplementedError

    def weights_to_hf(self, sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """The inverse of ``weights_from_hf``: the architecture's keys (with ``prefix``)."""
        raise NotImplementedError


class FFN(nn.Module):
    """Base class of every FFN module: ``forward(h_BTD) -> FFNOutput``.

    A layer may support run-time *interventions*: named changes of its computation
    that an experiment switches on for a while without touching its config (e.g.
    ``disable_top1``, CartesianMoE's robustness test). It lists them in
    ``supported_interventions()`` and asks ``self.intervening(name)`` in its forward;
    ``intervention(model, name)`` switches one on in every layer that supports it."""

    config: FFNConfig

    def supported_interventions(self) -> tuple[str, ...]:
        return ()

    def intervening(self, name: str) -> bool:
        return name in self.__dict__.get("_interventions", ())

    def row_tables(self) -> tuple[nn.Parameter, ...]:
        """Parameters read by row index (tables of experts or values): a step's gradient
        is zero in every row no token retrieved, so an optimizer may update only the
        touched rows (``train.row_sparse_updates``). None by default."""
        return ()

    def forward(self, h_BTD: Tensor, *, stats: Stats | None = None,
                context: CallContext | None = None) -> FFNOutput:  # pragma: no cover
        """``stats``: where to add this call's statistics records, if the caller wants
        them (``finemoe.layers.records``); ``context``: what the call may read besides
        the hidden states."""
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise in place: input projections with ``std``, output projections with
        ``out_std`` (scaled down with depth by the model), norms to one."""
        raise NotImplementedError


@contextmanager
def intervention(model: nn.Module, name: str) -> Iterator[int]:
    """Switch the run-time intervention ``name`` on in every FFN of ``model`` that
    supports it, for the duration of the block; yields how many layers it reached
    (0: the model has no layer that supports it)."""
    reached = [m for m in model.modules() if isinstance(m, FFN) and name in m.supported_interventions()]
    for module in reached:
        module.__dict__.setdefault("_interventions", set()).add(name)
    try:
        yield len(reached)
    finally:
        for module in reached:
            module.__dict__["_interventions"].discard(name)
