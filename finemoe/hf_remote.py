"""A finemoe model of any FFN kind as a ``transformers`` model (``trust_remote_code``).

``finemoe export`` copies this file into the exported folder as ``modeling_finemoe.py``
and names it in ``config.json``'s ``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

returns a ``PreTrainedModel`` whose forward is finemoe's ``Transformer`` (logits, and
the shifted cross-entropy when ``labels`` are given, as transformers' causal LMs do).
finemoe must be installed where it is loaded: the layers are finemoe's own code, not a
copy. Kinds with a native transformers architecture (dense → LLaMA, moe → Mixtral) are
exported natively instead and need neither.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class FinemoeConfig(PretrainedConfig):
    model_type = "finemoe"

    def __init__(self, finemoe: dict | None = None, **kwargs):
        self.finemoe = finemoe or {}
        """finemoe's ``ModelConfig`` as data (``finemoe.config.to_dict``)."""
        super().__init__(**kwargs)


class FinemoeForCausalLM(PreTrainedModel):
    config_class = FinemoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: FinemoeConfig):
        super().__init__(config)
        from finemoe.config import from_dict
        from finemoe.model import ModelConfig, Transformer

        self.model = Transformer(from_dict(ModelConfig, dict(config.finemoe)))
        self.post_init()

    def _init_weights(self, module) -> None:  # the weights come from the checkpoint
        pass

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None, **kwargs):
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
