"""`finemoe data`: formats, tokenizers, manifest, split, and clear errors with nothing half-written."""

from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest

from finemoe.data import DataError, TokenShards, build_shards, iter_documents, load_tokenizer

TEXTS = [f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (3 + i % 5) for i in range(60)]


def _jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    return path


def test_reads_every_format(tmp_path):
    _jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    _jsonl(tmp_path / "b.jsonl.gz", TEXTS[2:4], gzip.open)
    _jsonl(tmp_path / "c.jsonl.xz", TEXTS[4:6], lzma.open)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "x.py").write_text("print('hello')\n")
    (tmp_path / "tree" / "sub" / "y.py").write_text("def f():\n    return 1\n")
    (tmp_path / "tree" / "sub" / "skip.txt").write_text("not selected")
    docs = list(iter_documents([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl.xz"]))
    assert [d.text for d in docs] == TEXTS[:6]
    tree = list(iter_documents([tmp_path / "tree"], glob="**/*.py"))
    assert sorted(d.text for d in tree) == ["def f():\n    return 1\n", "print('hello')\n"]


def test_build_with_trained_bpe_round_trips_and_splits_by_document(tmp_path):
    src = _jsonl(tmp_path / "corpus.jsonl", TEXTS)
    manifest = build_shards([src], tmp_path / "out", vocab_size=320, val_fraction=0.2, progress=False)
    shards = TokenShards(tmp_path / "out")
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(TEXTS)
    assert 0 < val["documents"] < len(TEXTS)
    assert shards.num_tokens("train") == train["tokens"] and shards.dtype == np.uint16
    # Every document is there, each followed by the end-of-text token.
    tok = shards.tokenizer()
    all_ids = np.concatenate([np.asarray(a) for a in shards.arrays("train") + shards.arrays("val")])
    pieces = np.split(all_ids, np.nonzero(all_ids == shards.eos_id)[0] + 1)[:-1]
    decoded = sorted(tok.decode(p[:-1].tolist()) for p in pieces)
    assert decoded == sorted(TEXTS)
    assert manifest["sources"][0]["sha256"] and manifest["tokenizer"]["sha256"]
    # The split is a pure function of the document ids: a rebuild gives the same split.
    again = build_shards([src], tmp_path / "out2", vocab_size=320, val_fraction=0.2, progress=False)
    assert again["splits"]["val"]["documents"] == val["documents"]


def test_fingerprint_names_the_tokens_not_the_location(tmp_path):
    """The same source tree at two paths gives the same fingerprint (what the model sees);
    one changed byte in one file gives another; a run records it without the file list."""
    import hashlib

    for where in ("a", "b"):
        for i, text in enumerate(TEXTS[:30]):
            (tmp_path / where / "pkg" / f"m{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / where / "pkg" / f"m{i:02d}.py").write_text(text)
    a = build_shards([tmp_path / "a"], tmp_path / "out_a", vocab_size=300, glob="**/*.py", val_fraction=0.2, progress=False)
    b = build_shards([tmp_path / "b"], tmp_path / "out_b", vocab_size=300, glob="**/*.py", val_fraction=0.2, progress=False)
    assert a["fingerprint"] == b["fingerprint"] and len(a["fingerprint"]) == 64
    # by hand: the tokenizer's hash, then each shard's name, token count and hash, in order
    digest = hashlib.sha256(a["tokenizer"]["sha256"].encode())
    for split in ("train", "val"):
        for f in a["splits"][split]["files"]:
            data = (tmp_path / "out_a" / f["name"]).read_bytes()
            digest.update(f"{split}/{f['name']}:{f['tokens']}:{hashlib.sha256(data).hexdigest()}".encode())
    assert a["fingerprint"] == digest.hexdigest()
    assert a["source_bytes"] == sum(len(t.encode()) for t in TEXTS[:30])
    (tmp_path / "b" / "pkg" / "m07.py").write_text(TEXTS[7] + "!")
    c = build_shards([tmp_path / "b"], tmp_path / "out_c", vocab_size=300, glob="**/*.py", val_fraction=0.2, progress=False)
    assert c["fingerprint"] != a["fingerprint"]
    described = TokenShards(tmp_path / "out_a").describe()
    assert described["fingerprint"] == a["fingerprint"] and described["source_files"] == 30
    assert len(described["sources"]) == 4  # three named, then a pointer to the manifest


def test_dedupe_keeps_one_copy_of_each_text(tmp_path):
    """Copies of one file under several names (vendored modules) are read once: without
    dedupe they would be split across train and val by their different ids."""
    for i, text in enumerate(TEXTS[:20]):
        (tmp_path / "src" / f"m{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"m{i:02d}.py").write_text(text)
        (tmp_path / "src" / "vendored" / f"copy{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "vendored" / f"copy{i:02d}.py").write_text(text)
    kept = build_shards([tmp_path / "src"], tmp_path / "d", vocab_size=300, glob="**/*.py", val_fraction=0.3,
                        dedupe=True, progress=False)
    assert kept["duplicates_dropped"] == 20
    assert kept["splits"]["train"]["documents"] + kept["splits"]["val"]["documents"] == 20
    shards = TokenShards(tmp_path / "d")
    tok = shards.tokenizer()
    ids = np.concatenate([np.asarray(a) for a in shards.arrays("train") + shards.arrays("val")])
    decoded = [tok.decode(p[:-1].tolist()) for p in np.split(ids, np.nonzero(ids == shards.eos_id)[0] + 1)[:-1]]
    assert sorted(decoded) == sorted(TEXTS[:20])
    plain = build_shards([tmp_path / "src"], tmp_path / "p", vocab_size=300, glob="**/*.py", progress=False)
    assert plain["duplicates_dropped"] is None
    assert plain["splits"]["train"]["documents"] + plain["splits"]["val"]["documents"] == 40


def test_build_with_a_given_tokenizer_and_val_inputs(tmp_path):
    train_src = _jsonl(tmp_path / "train.jsonl", TEXTS[:40])
    val_src = _jsonl(tmp_path / "val.jsonl", TEXTS[40:])
    build_shards([train_src], tmp_path / "bpe", vocab_size=300, progress=False)
    tok_path = tmp_path / "bpe" / "tokenizer.json"
    m = build_shards([train_src], tmp_path / "out", tokenizer_path=tok_path, val_inputs=[val_src], progress=False)
    assert m["splits"]["train"]["documents"] == 40 and m["splits"]["val"]["documents"] == 20
    tok = load_tokenizer(tok_path)
    assert m["splits"]["val"]["tokens"] == sum(len(tok.encode(t).ids) + 1 for t in TEXTS[40:])


def test_sampling_is_deterministic_per_generator(tmp_path):
    build_shards([_jsonl(tmp_path / "c.jsonl", TEXTS)], tmp_path / "out", vocab_size=300, progress=False)
    shards = TokenShards(tmp_path / "out")
    a = shards.sample("train", 4, 16, np.random.default_rng([1, 2]))
    b = shards.sample("train", 4, 16, np.random.default_rng([1, 2]))
    c = shards.sample("train", 4, 16, np.random.default_rng([1, 3]))
    assert a.shape == (4, 17) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_shards([src], tmp_path / "out", vocab_size=300, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left


def test_non_utf8_names_the_file_and_byte_offset(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", TEXTS[:10])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld ".encode() + b"\xff\xfe rest")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 at byte offset 14"):
        build_shards([good, bad], tmp_path / "out", vocab_size=300, progress=False)
    assert not (tmp_path / "out").exists()
    m = build_shards([good, bad], tmp_path / "out", vocab_size=300, skip_invalid=True, progress=False)
    assert m["skipped_files"] == 1
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 10


def test_non_utf8_in_a_compressed_jsonl_line(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "fine"}\n')
        f.write(b'{"text": "bad \xc3"}\n')  # 17 bytes before it, then 14: offset 31
    with pytest.raises(DataError, match=r"x.jsonl.gz: not UTF-8 at byte offset 31 .*decompressed"):
        list(iter_documents([path]))


def test_vocabulary_too_large_for_dtype(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", TEXTS)
    big = tmp_path / "big.json"
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(big))
    with pytest.raises(DataError, match="does not fit in uint16"):
        build_shards([src], tmp_path / "out", tokenizer_path=big, dtype="uint16", progress=False)
    m = build_shards([src], tmp_path / "out", tokenizer_path=big, progress=False)  # picks uint32 itself
    assert m["dtype"] == "uint32"


def test_refuses_to_overwrite_and_reports_missing_inputs(tmp_path):
    src = _jsonl(tmp_path / "c.jsonl", TEXTS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        build_shards([src], tmp_path / "out", vocab_size=300, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    with pytest.raises(DataError, match="no such file"):
        build_shards([tmp_path / "nope.txt"], tmp_path / "o2", vocab_size=300, progress=False)


def test_truncated_shard_is_detected(tmp_path):
    build_shards([_jsonl(tmp_path / "c.jsonl", TEXTS)], tmp_path / "out", vocab_size=300, progress=False)
    shard = tmp_path / "out" / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenShards(tmp_path / "out").arrays("train")


def test_cli_data_error_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from finemoe.cli import app

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff")
    result = CliRunner().invoke(app, ["data", str(bad), "--out", str(tmp_path / "o"), "--vocab-size", "300"])
    assert result.exit_code == 2
    assert "not UTF-8 at byte offset 0" in result.output


def test_parquet_zstd_and_hugging_face_inputs(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    zstandard = pytest.importorskip("zstandard")
    pq.write_table(pa.table({"text": TEXTS[:3], "id": ["a", "b", "c"]}), tmp_path / "x.parquet")
    payload = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[3:5]).encode()
    (tmp_path / "y.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    docs = [d.text for d in iter_documents([tmp_path / "x.parquet", tmp_path / "y.jsonl.zst"])]
    assert docs == TEXTS[:5]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS[5:8]}).save_to_disk(str(tmp_path / "hfds"))
    assert [d.text for d in iter_documents([f"hf:{tmp_path / 'hfds'}"])] == TEXTS[5:8]


def test_split_does_not_depend_on_where_the_data_lives(tmp_path):
    """Document ids are relative (file name, or path under the input folder)."""
    for place in ("a", "b/deeper"):
        folder = tmp_path / place
        folder.mkdir(parents=True)
        _jsonl(folder / "corpus.jsonl", TEXTS)
        (folder / "tree" / "sub").mkdir(parents=True)
        for i in range(30):
            (folder / "tree" / "sub" / f"f{i}.txt").write_text(TEXTS[i])
    built = [build_shards([tmp_path / p / "corpus.jsonl", tmp_path / p / "tree"], tmp_path / f"out-{i}", vocab_size=300,
                          val_fraction=0.3, progress=False) for i, p in enumerate(("a", "b/deeper"))]
    assert built[0]["splits"] == built[1]["splits"]
    a, b = TokenShards(tmp_path / "out-0"), TokenShards(tmp_path / "out-1")
    assert np.array_equal(np.asarray(a.arrays("val")[0]), np.asarray(b.arrays("val")[0]))
