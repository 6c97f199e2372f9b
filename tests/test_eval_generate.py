"""Evaluation (perplexity, bits per byte, zero-shot scoring, parity with a HF model) and
generation (KV cache equals recomputation for every kind; sampling filters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finemoe import ModelConfig, Transformer
from finemoe.evaluate import encode_pair, evaluate_perplexity, loglikelihoods, score_task, stderr_of_mean
from finemoe.generate import generate, sample_next
from tests.test_training import SMALL


class _Uniform(torch.nn.Module):
    """Logits of zeros: every token has probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        class Out:
            logits = torch.zeros(*ids.shape, self.vocab)

        return Out()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    from finemoe.data import TokenShards, build_shards

    src = tmp_path / "c.txt"
    src.write_text("abc def ghi " * 400)
    build_shards([src], tmp_path / "s", vocab_size=300, val_fraction=0.0, progress=False)
    shards = TokenShards(tmp_path / "s")
    V = shards.vocab_size
    r = evaluate_perplexity(_Uniform(V), shards, split="train", seq_len=16, batch_size=4, progress=False)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    # bits per byte = tokens · log2(V) / bytes
    tok = shards.tokenizer()
    ids = np.asarray(shards.arrays("train")[0])
    n_windows = (len(ids) - 1) // 16
    targets = [ids[i * 16 + 1 : i * 16 + 17].tolist() for i in range(n_windows)]
    n_bytes = sum(len(tok.decode(t, skip_special_tokens=False).encode()) for t in targets)
    assert r["tokens"] == 16 * n_windows
    assert r["bits_per_byte"] == pytest.approx(r["tokens"] * math.log2(V) / n_bytes, rel=1e-6)


def test_encode_pair_moves_trailing_spaces_like_lm_eval():
    def enc(s):
        return [ord(c) for c in s]

    assert encode_pair(enc, "Question: x\nAnswer: ", "yes", None) == (enc("Question: x\nAnswer:"), enc(" yes"))
    assert encode_pair(enc, "", "yes", 7) == ([7], enc("yes"))


def test_loglikelihood_by_hand():
    torch.manual_seed(0)
    table = torch.randn(11, 11)  # a bigram model: logits of the next token depend on the current one

    def logits_fn(ids):
        return table[ids]

    context, continuation = [1, 2, 3], [4, 5]
    expected = torch.log_softmax(table[3], -1)[4] + torch.log_softmax(table[4], -1)[5]
    greedy = bool(table[3].argmax() == 4 and table[4].argmax() == 5)
    (ll, is_greedy), (ll2, _) = loglikelihoods(logits_fn, [(context, continuation), ([9], [4])], max_len=8)
    assert ll == pytest.approx(float(expected), abs=1e-5) and is_greedy == greedy
    assert ll2 == pytest.approx(float(torch.log_softmax(table[9], -1)[4]), abs=1e-5)
    # Truncation keeps the last tokens: a window of 2 drops the first context token.
    (ll3, _), = loglikelihoods(logits_fn, [([8, 1, 2, 3], continuation)], max_len=3)
    assert ll3 == pytest.approx(float(expected), abs=1e-5)


def test_stderr_of_mean():
    assert stderr_of_mean([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def test_zero_shot_scores_match_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from finemoe.convert import from_hf
    from finemoe.data import ASSETS

    tokenizer = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    ours = from_hf(hf).eval()
    rows = [
        {"context": "The whale swam", "choices": [" fast", " to the sea", " home"], "gold": 1},
        {"context": "Call me ", "choices": ["Ishmael.", "Ahab."], "gold": 0},
        {"context": "Question: what is red?\nAnswer:", "choices": [" blood", " grass"], "gold": 0},
    ]
    with torch.no_grad():
        ref = score_task(lambda ids: hf(ids).logits, tokenizer, "piqa", rows, max_len=64)
        got = score_task(lambda ids: ours(ids).logits, tokenizer, "piqa", rows, max_len=64)
        lam_rows = [{"context": "the old man and the", "target": " sea"}]
        assert score_task(lambda ids: ours(ids).logits, tokenizer, "lambada", lam_rows, max_len=64)["n"] == 1
    assert got == ref
    # And the underlying log-likelihoods agree numerically.
    enc = lambda s: tokenizer.encode(s).ids  # noqa: E731
    reqs = [encode_pair(enc, r["context"], c, None) for r in rows for c in r["choices"]]
    with torch.no_grad():
        a = loglikelihoods(lambda ids: hf(ids).logits, reqs, max_len=64)
        b = loglikelihoods(lambda ids: ours(ids).logits, reqs, max_len=64)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4)


CACHED_KINDS = sorted(SMALL)


@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_kv_cache_generation_equals_recomputation(kind):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40,
                                    ffn=SMALL[kind])).eval()
    prompt = torch.randint(0, 64, (3, 7))
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    full = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)
    # and logits: a chunk after a cached prefix equals the same positions of a full pass
    from finemoe.model import KVCache

    ids = torch.randint(0, 64, (2, 12))
    cache = KVCache(model, 2)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        chunk = model(ids[:, 5:], cache=cache).logits
        whole = model(ids).logits[:, 5:]
    torch.testing.assert_close(chunk, whole, atol=1e-5, rtol=1e-4)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])
    assert int(sample_next(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None)) == 1
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}
    probs = torch.softmax(logits, -1)[0]  # 0.71, 0.26, ...: top_p 0.5 keeps only the best token
    assert float(probs[1]) > 0.5
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.5, top_k=0, generator=g)) for _ in range(100)}
    assert draws == {1}


def test_generation_stops_at_eos_and_respects_max_len():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_seq_len=12))
    out = generate(model, torch.zeros(2, 4, dtype=torch.long), 50, temperature=1.0, seed=1)
    assert out.shape[1] == 12  # capped by max_seq_len
    eos = int(out[0, 4])
    stopped = generate(model, torch.zeros(1, 4, dtype=torch.long), 50, temperature=1.0, seed=1, eos_id=eos)
    assert stopped.shape[1] == 5 and int(stopped[0, -1]) == eos
