"""Evaluation: perplexity and bits per byte on a token split, and zero-shot
multiple-choice accuracy on the eval sets of the data pack, scored as
lm-evaluation-harness scores them.

Multiple choice: each choice is scored by ``Σ log p(choice tokens | context)``; ``acc``
takes the best sum, ``acc_norm`` the best sum divided by the choice's length in
characters (lm-eval's length normalisation). Context and continuation are encoded as
lm-eval does: trailing spaces of the context move to the continuation, and the
continuation's tokens are those of ``encode(context + continuation)`` after
``encode(context)``. Standard errors are the sample standard error of the mean.

Everything that scores takes a ``logits_fn(ids_BT) -> logits_BTV``, so any model (a
finemoe ``Transformer``, a Hugging Face model) is scored by the same code.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "evaluate_perplexity",
    "loglikelihoods",
    "encode_pair",
    "load_task",
    "score_task",
    "TASKS",
    "stderr_of_mean",
    "sequences_per_pass",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "sciq", "openbookqa", "copa", "lambada")


def sequences_per_pass(model, batch_size: int) -> int:
    """``batch_size``, or 1 for a model whose routing couples the sequences of a batch
    (expert choice): its scores must not depend on the batch they were computed in."""
    config = getattr(getattr(model, "module", model), "config", None)
    return 1 if getattr(config, "couples_sequences", False) else batch_size


def _logits_fn(model) -> LogitsFn:
    if callable(getattr(model, "forward", None)) and not isinstance(model, type):

        def fn(ids):
            out = model(ids)
            return out.logits

        return fn
    return model


@torch.no_grad()
def evaluate_perplexity(
    model,
    shards,
    *,
    split: str = "val",
    seq_len: int,
    batch_size: int = 16,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Mean next-token loss over the split (every token but the first predicted once),
    perplexity ``exp(loss)``, and bits per byte ``Σ nats / (ln 2 · UTF-8 bytes)``."""
    from tqdm import tqdm

    shards.check_window(split, seq_len)
    if sequences_per_pass(model, batch_size) != batch_size:  # the same windows, one per pass
        max_batches = None if max_batches is None else max_batches * batch_size
        batch_size = 1
    logits_fn = _logits_fn(model)
    tokenizer = shards.tokenizer()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    batches = shards.sequential(split, batch_size, seq_len, max_batches)
    for window in tqdm(batches, desc=f"eval {split}", disable=not progress, leave=False):
        window_t = torch.from_numpy(window).to(device)
        logits = logits_fn(window_t[:, :-1])
        nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window_t[:, 1:].reshape(-1), reduction="sum")
        total_nats += float(nats)
        total_tokens += window_t[:, 1:].numel()
        total_bytes += sum(len(text.encode("utf-8")) for text in tokenizer.decode_batch(window[:, 1:].tolist(),
                                                                                       skip_special_tokens=False))
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total_nats / (math.log(2) * max(total_bytes, 1)),
        "tokens": total_tokens,
    }


# -- log-likelihood requests ------------------------------------------------------------------------


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str, bos_id: int | None) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    continuation_ids = whole[len(context_ids) :]
    if not context_ids and bos_id is not None:
        context_ids = [bos_id]
    return context_ids, continuation_ids


@torch.no_grad()
def loglikelihoods(
    logits_fn: LogitsFn,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(Σ log p(continuation | context), continuation is the greedy decode)`` per
    request; inputs longer than ``max_len`` keep their last tokens. Requests are run
    longest first, padded on the right."""
    from tqdm import tqdm

    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("an empty continuation cannot be scored")
        full = (context + continuation)[-(max_len + 1) :]
        prepared.append((full[:-1], continuation))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="scoring", leave=False):
        chunk = order[start : start + batch_size]
        width = max(len(prepared[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp = prepared[i][0]
            ids[row, : len(inp)] = torch.tensor(inp)
        logprobs = torch.log_softmax(logits_fn(ids.to(device)).float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            inp, continuation = prepared[i]
            n = len(continuation)
            positions = torch.arange(len(inp) - n, len(inp))
            target = torch.tensor(continuation)
            lp = logprobs[row, positions]
            results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return results


def stderr_of_mean(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(n))


# -- tasks --------------------------------------------------------------------------------------------


def load_task(evals_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    path = Path(evals_dir) / f"{name}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such eval set (tasks: {', '.join(TASKS)})")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _requests(name: str, row: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(context, continuation) pairs of one example, and the strings whose lengths
    normalise each choice."""
    if name == "winogrande":
        return [(ctx, row["continuation"]) for ctx in row["option_contexts"]], [row["continuation"]] * 2
    if name == "lambada":
        return [(row["context"], row["target"])], [row["target"]]
    return [(row["context"], choice) for choice in row["choices"]], list(row["choices"])


def score_task(
    model_or_logits_fn,
    tokenizer,
    name: str,
    rows: Iterable[dict],
    *,
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    bos_id: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot accuracy on one task: ``acc`` and ``acc_norm`` (``acc`` only for
    winogrande, greedy-match accuracy for lambada), with standard errors. A model whose
    routing couples the sequences of a batch is run one request at a time."""
    rows = list(rows)
    logits_fn = _logits_fn(model_or_logits_fn)
    batch_size = sequences_per_pass(model_or_logits_fn, batch_size)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    requests, spans, lengths = [], [], []
    for row in rows:
        pairs, norms = _requests(name, row)
        spans.append((len(requests), len(requests) + len(pairs)))
        requests.extend(encode_pair(encode, c, x, bos_id) for c, x in pairs)
        lengths.extend(len(s) for s in norms)
    scores = loglikelihoods(logits_fn, requests, max_len=max_len, batch_size=batch_size, device=device, progress=progress)
    acc, acc_norm = [], []
    for row, (a, b) in zip(rows, spans):
        if name == "lambada":
            acc.append(float(scores[a][1]))
            continue
        ll = np.array([scores[i][0] for i in range(a, b)])
        acc.append(float(int(np.argmax(ll)) == row["gold"]))
        acc_norm.append(float(int(np.argmax(ll / np.array(lengths[a:b]))) == row["gold"]))
    result = {"n": len(rows), "acc": float(np.mean(acc)), "acc_stderr": stderr_of_mean(acc)}
    if acc_norm and name != "winogrande":
        result |= {"acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": stderr_of_mean(acc_norm)}
    return result


def lm_eval_task_yaml(task: str, data_file: str | Path) -> str:
    """An lm-evaluation-harness task file for a multiple-choice eval set in finemoe's
    format (``context`` / ``choices`` / ``gold`` rows, choices carrying their leading
    space, hence no target delimiter): lm-eval then scores exactly what ``score_task``
    scores, offline (``tools/lm_eval_tasks.py``)."""
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {Path(data_file).resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
