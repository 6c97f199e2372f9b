"""finemoe models in lm-evaluation-harness: the model class ``finemoe``.

``lm_eval``'s command line has no hook for model classes from other packages, so it is
run through finemoe, which registers the class first and then hands over every option:

    finemoe lm-eval --model finemoe --model_args path=runs/smollm2 --tasks piqa,arc_easy

or from Python, after ``import finemoe.lm_eval_harness``:
``lm_eval.simple_evaluate(model="finemoe", model_args="path=runs/smollm2", tasks=[...])``.
``path`` is anything ``finemoe eval`` takes (a run folder, a checkpoint, a Hugging Face
folder or ``.gguf`` file); ``device`` (default ``auto``), ``batch_size`` and
``max_length`` (default: the model's context) are optional. Log-likelihoods come from
the same function as ``finemoe eval``'s zero-shot scores (``evaluate.loglikelihoods``),
so the two agree on the same examples (tested).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own model names first: a non-empty registry is not filled lazily)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from finemoe.evaluate import _logits_fn, loglikelihoods, sequences_per_pass

__all__ = ["FinemoeLM"]


@register_model("finemoe")
class FinemoeLM(TemplateLM):
    def __init__(self, path: str, device: str = "auto", batch_size: int | str = 16, max_length: int | None = None,
                 **_unused) -> None:
        super().__init__()
        from finemoe.checkpoint import load_model

        if device in ("auto", None):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = device  # lm-eval's ``device`` property reads it
        self.model, self.run_config, self.tok = load_model(path, device)
        if self.tok is None:
            raise ValueError(f"{path}: the checkpoint carries no tokenizer")
        self.scoring_batch = sequences_per_pass(self.model, int(batch_size) if str(batch_size).isdigit() else 16)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        ends = [self.tok.token_to_id(t) for t in (self.run_config.end_tokens or ["<|endoftext|>"])]
        self.end_ids = [i for i in ends if i is not None] or [0]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda")
                         else torch.autocast("cpu", enabled=False))

    @property
    def eot_token_id(self) -> int:
        return self.end_ids[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _scores(self, requests: list[tuple[list[int], list[int]]], progress: bool) -> list[tuple[float, bool]]:
        with torch.no_grad(), self.autocast:
            return loglikelihoods(_logits_fn(self.model), requests, max_len=self.max_length,
                                  batch_size=self.scoring_batch, device=self.device, progress=progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._scores([(context, continuation) for _, context, continuation in requests], not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of the model's context."""
        out = []
        for (text,) in (req.args for req in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._scores(windows, False)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless ``do_sample``; stops at the model's end tokens, at any ``until``
        string, or after ``max_gen_toks``."""
        from finemoe.generate import generate

        out = []
        for context, kwargs in (req.args for req in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = torch.tensor([self.tok_encode(context)[-(self.max_length - 1):] or [self.eot_token_id]])
            with self.autocast:
                full = generate(self.model, ids, int(kwargs.get("max_gen_toks", 256)), temperature=temperature,
                                top_p=float(kwargs.get("top_p", 1.0)), eos_id=self.end_ids)
            new = [t for t in full[0, ids.shape[1]:].tolist() if t not in self.end_ids]
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
