"""Text → token shards, and token shards → training batches.

``build_shards`` reads UTF-8 documents from ``.txt`` (one document per file),
``.jsonl`` (one per line, a ``text`` field) or ``.parquet`` (a ``text`` column), any of
them compressed (``.gz``, ``.xz``, ``.bz2``, ``.zst``), a directory tree selected by a
glob, or a Hugging Face dataset (``hf:NAME[:CONFIG][@SPLIT]``, optional ``datasets``); tokenizes them with a ``tokenizers`` JSON file, or a byte-level BPE trained on
the input; and writes memory-mappable token arrays with a JSON manifest. Documents are
separated by the end-of-text token, and split into train/val deterministically by a
hash of their id. Everything is written to a temporary folder and renamed into place
at the end, so an interrupted or failed run leaves nothing half-written.

``TokenShards`` reads them back: random training windows drawn from a generator the
caller seeds (so a resumed run draws the same batches), and sequential evaluation
windows.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from finemoe.errors import InputError

__all__ = [
    "DataError",
    "Document",
    "iter_documents",
    "train_bpe_tokenizer",
    "build_shards",
    "TokenShards",
    "embedded_corpus",
    "embedded_shards",
    "MANIFEST",
]

MANIFEST = "manifest.json"
FORMAT = "finemoe-token-shards-v1"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "[SEP]")
ASSETS = Path(__file__).parent / "assets" / "default"


class DataError(InputError):
    """Bad input data: the message names the file (and byte offset) at fault."""


@dataclass
class Document:
    id: str
    text: str


# -- reading ------------------------------------------------------------------------------------

COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
FORMATS = (".txt", ".jsonl", ".json", ".parquet", ".md", ".rst", ".py")


def _open_binary(path: Path) -> IO[bytes]:
    suffix = path.suffix
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the `zstandard` package (pip install zstandard)") from None
        # BufferedReader adds the line iteration that the raw zstd stream lacks
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _inner_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        compressed = " (in the decompressed stream)" if Path(where).suffix in COMPRESSIONS else ""
        raise DataError(f"{where}: not UTF-8 at byte offset {offset + err.start}{compressed}: {err.reason}") from None


def _read_file(path: Path, text_field: str, counters: dict, doc_prefix: str | None = None) -> Iterator[Document]:
    """Documents of one file. Their ids start with ``doc_prefix`` (default: the file's
    name), never its absolute path, so that the train/val split by id does not depend
    on where the data lives."""
    kind = _inner_suffix(path)
    where = str(path)
    prefix = doc_prefix or path.name
    try:
        if kind == ".parquet":
            yield from _read_parquet(path, text_field, prefix)
            return
        if kind in (".jsonl", ".json"):
            offset = 0
            with _open_binary(path) as f:
                for i, raw in enumerate(f):
                    line = _decode(raw, where, offset)
                    offset += len(raw)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{where}: line {i + 1} is not JSON: {err.msg}") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise DataError(f"{where}: line {i + 1} has no {text_field!r} field")
                    text = record[text_field]
                    if text is not None and not isinstance(text, str):
                        raise DataError(f"{where}: line {i + 1}: {text_field!r} is {type(text).__name__}, not a string")
                    if text:
                        yield Document(f"{prefix}#{record.get('id', i)}", text)
            return
        with _open_binary(path) as f:
            text = _decode(f.read(), where)
        if text:
            yield Document(prefix, text)
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as err:
        # a truncated or corrupt compressed stream, or a file that cannot be read
        error = DataError(f"{where}: cannot be read ({type(err).__name__}: {err})")
        if not counters.get("skip_invalid"):
            raise error from None
        counters.setdefault("skipped", set()).add(str(path))
    except DataError:
        if not counters.get("skip_invalid"):
            raise
        counters.setdefault("skipped", set()).add(str(path))


def _read_parquet(path: Path, text_field: str, prefix: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs `pyarrow` (pip install pyarrow)") from None
    with _open_binary(path) as f:
        data = io.BytesIO(f.read())
    try:
        schema = pq.read_schema(data)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in schema.names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(schema.names)}); "
                        f"name the text column with --text-field")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} holds {column_type}, not strings")
    try:
        table = pq.read_table(data, columns=[text_field])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for i, text in enumerate(table.column(text_field).to_pylist()):
        if text:
            yield Document(f"{prefix}#{i}", text)


HF_PREFIX = "hf:"


def _read_hf(spec: str, text_field: str) -> Iterator[Document]:
    """``hf:NAME[:CONFIG][@SPLIT]`` (``datasets.load_dataset``, streamed; needs a hub or
    its cache) or ``hf:PATH`` of a folder written by ``Dataset.save_to_disk``."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs `datasets` (pip install 'finemoe[extras]')") from None
    body = spec[len(HF_PREFIX):]
    if Path(body).is_dir():
        dataset = datasets.load_from_disk(body)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
    else:
        body, _, split = body.partition("@")
        name, _, config = body.partition(":")
        dataset = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for i, record in enumerate(dataset):
        if text_field not in record:
            raise DataError(f"{spec}: record {i} has no {text_field!r} field")
        if record[text_field]:
            yield Document(f"{spec}#{record.get('id', i)}", str(record[text_field]))


def _expand(inputs: Iterable[str | Path], glob: str | None) -> list[tuple[Path | str, str | None]]:
    """``(file, id prefix)`` pairs to read; ``hf:`` specs pass through. A file found under a
    folder gets its path relative to that folder as the prefix of its document ids."""
    files: list[tuple[Path | str, str | None]] = []
    for item in inputs:
        if str(item).startswith(HF_PREFIX):
            files.append((str(item), None))  # resolved by _read_hf
            continue
        path = Path(item)
        if path.is_dir():
            pattern = glob or "**/*"
            found = sorted(p for p in path.glob(pattern) if p.is_file())
            if not found:
                raise DataError(f"{path}: no file matches {pattern!r}")
            files.extend((p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            files.append((path, None))
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def iter_documents(
    inputs: Iterable[str | Path], *, glob: str | None = None, text_field: str = "text", counters: dict | None = None
) -> Iterator[Document]:
    """Every document of ``inputs`` (files, folders, ``hf:`` datasets), in a
    deterministic order. With ``counters={"skip_invalid": True}``, a file that is not
    UTF-8 (or not valid JSONL) is skipped and recorded in the set
    ``counters["skipped"]`` instead of raising."""
    counters = {} if counters is None else counters
    for path, prefix in _expand(inputs, glob):
        if isinstance(path, str):
            yield from _read_hf(path, text_field)
        else:
            yield from _read_file(path, text_field, counters, prefix)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256_file(path)}


def corpus_fingerprint(splits: dict, tokenizer_sha256: str) -> str:
    """One hash of what a model trained on these shards sees: the tokenizer and every
    shard's tokens (their sha256, taken as they were written), in order. Independent of
    where the sources lay, so the same corpus rebuilt on another machine from the same
    files has the same fingerprint."""
    digest = hashlib.sha256(tokenizer_sha256.encode())
    for split in ("train", "val"):
        for f in splits[split]["files"]:
            digest.update(f"{split}/{f['name']}:{f['tokens']}:{f['sha256']}".encode())
    return digest.hexdigest()


# -- tokenizers ------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, eos_token: str = "<|endoftext|>"):
    """A byte-level BPE (GPT-2 style) of ``vocab_size`` tokens trained on ``texts``;
    ``eos_token`` gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs > 256 + specials)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: not a `tokenizers` JSON file ({err})") from None


def find_eos(tokenizer, eos_token: str | None) -> tuple[str, int]:
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return name, token_id
    raise DataError(
        f"the tokenizer has no end-of-text token {eos_token!r}" if eos_token
        else f"the tokenizer has none of {', '.join(EOS_CANDIDATES)}; name one with --eos-token"
    )


def shard_dtype(vocab_size: int, requested: str | None = None) -> np.dtype:
    if requested is None:
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dtype = np.dtype(requested)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"shard dtype must be uint16 or uint32, got {requested}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"a vocabulary of {vocab_size:,} tokens does not fit in {dtype.name} shards (max {np.iinfo(dtype).max + 1:,})")
    return dtype


# -- writing -----------------------------------------------------------------------------------------


def _is_val(doc_id: str, val_fraction: float) -> bool:
    bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 1_000_000
    return bucket < val_fraction * 1_000_000


class _SplitWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.documents = 0
        self.tokens = 0
        self._handle = None
        self._in_shard = 0

    def _next_file(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self.files):04d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self._handle = open(self.folder / name, "wb")
        self._digest = hashlib.sha256()  # of the bytes as written: no second read for the fingerprint
        self._in_shard = 0

    def _close_file(self) -> None:
        if self._handle:
            self._handle.close()
            self.files[-1]["sha256"] = self._digest.hexdigest()
            self._handle = None

    def write(self, ids: list[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        start = 0
        while start < len(array):
            if self._handle is None or self._in_shard >= self.shard_tokens:
                self._next_file()
            take = min(len(array) - start, self.shard_tokens - self._in_shard)
            chunk = array[start : start + take].tobytes()
            self._handle.write(chunk)
            self._digest.update(chunk)
            self._in_shard += take
            self.files[-1]["tokens"] += take
            start += take
        self.tokens += len(array)
        self.documents += 1

    def close(self) -> dict:
        self._close_file()
        return {"files": self.files, "documents": self.documents, "tokens": self.tokens}


def build_shards(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.01,
    val_inputs: list[str | Path] | None = None,
    glob: str | None = None,
    text_field: str = "text",
    eos_token: str | None = None,
    dtype: str | None = None,
    skip_invalid: bool = False,
    dedupe: bool = False,
    shard_tokens: int = 100_000_000,
    batch_documents: int = 512,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into ``out_dir`` (see the module docstring); returns the manifest.

    Give either ``tokenizer_path`` (a ``tokenizers`` JSON) or ``vocab_size`` (train a
    byte-level BPE on the training documents). With ``val_inputs``, those documents
    form the validation split and ``val_fraction`` is not used. With ``dedupe``, a
    document whose exact text was already read is dropped (vendored copies of one file
    would otherwise land on both sides of the split).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if (tokenizer_path is None) == (vocab_size is None):
        raise DataError("give either a tokenizer file or a vocabulary size to train one")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir} exists and is not empty (pass overwrite to replace it)")
    started = time.time()
    counters = {"skip_invalid": skip_invalid}
    input_files = _expand(inputs, glob)
    val_files = _expand(val_inputs, glob) if val_inputs else []

    def documents() -> Iterator[tuple[Document, bool]]:
        # read twice (tokenizer training, then encoding): each pass starts its own count
        seen: set[bytes] = set()
        counters["duplicates"] = 0
        for doc, is_val in itertools.chain(
            ((doc, (not val_files) and _is_val(doc.id, val_fraction))
             for doc in iter_documents(inputs, glob=glob, text_field=text_field, counters=counters)),
            ((doc, True) for doc in iter_documents(val_inputs or [], glob=glob, text_field=text_field, counters=counters)),
        ):
            if dedupe:
                key = hashlib.sha1(doc.text.encode("utf-8", "surrogatepass")).digest()
                if key in seen:
                    counters["duplicates"] += 1
                    continue
                seen.add(key)
            yield doc, is_val

    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        train_texts = (doc.text for doc, is_val in documents() if not is_val)
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size, eos_token=eos_token or "<|endoftext|>")
    eos_name, eos_id = find_eos(tokenizer, eos_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    np_dtype = shard_dtype(vocab, dtype)

    created = [p for p in reversed(out_dir.parents) if not p.exists()]  # removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writers = {split: _SplitWriter(staging, split, np_dtype, shard_tokens) for split in ("train", "val")}
        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
        batch: list[tuple[Document, bool]] = []

        def flush() -> None:
            # encode_batch runs on all cores (the Rust tokenizer's thread pool).
            encodings = tokenizer.encode_batch([doc.text for doc, _ in batch])
            for (doc, is_val), enc in zip(batch, encodings):
                writers["val" if is_val else "train"].write(enc.ids + [eos_id])
            bar.update(len(batch))
            batch.clear()

        for item in documents():
            batch.append(item)
            if len(batch) >= batch_documents:
                flush()
        if batch:
            flush()
        bar.close()
        splits = {name: w.close() for name, w in writers.items()}
        if splits["train"]["documents"] == 0:
            skipped = len(counters.get("skipped", ()))
            raise DataError("the corpus is empty: no training document was read" + (f" ({skipped} files skipped)" if skipped else ""))
        tokenizer.save(str(staging / "tokenizer.json"))
        tokenizer_sha256 = _sha256_file(staging / "tokenizer.json")
        sources = [file_fingerprint(p) if isinstance(p, Path) else {"path": p} for p, _ in input_files + val_files]
        manifest = {
            "format": FORMAT,
            "fingerprint": corpus_fingerprint(splits, tokenizer_sha256),
            "dtype": np_dtype.name,
            "vocab_size": vocab,
            "eos_token": eos_name,
            "eos_id": eos_id,
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": tokenizer_sha256,
                "source": str(tokenizer_path) if tokenizer_path else f"byte-level BPE trained here, vocab {vocab_size}",
            },
            "splits": splits,
            "val_rule": f"documents of {[str(p) for p, _ in val_files]}" if val_files
            else f"sha256(document id) bucket < {val_fraction} (document-level)",
            "sources": sources,
            "source_bytes": sum(src.get("bytes", 0) for src in sources),
            "skipped_files": len(counters.get("skipped", ())),
            "duplicates_dropped": counters["duplicates"] if dedupe else None,
            "seconds": round(time.time() - started, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # the parent folders this call made, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return manifest


# -- reading shards --------------------------------------------------------------------------------


class TokenShards:
    """A folder written by ``build_shards``, memory-mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.folder}: no {MANIFEST}; build it with `finemoe data`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{manifest_path}: not valid JSON ({err.msg})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise DataError(f"{manifest_path}: unknown format {found!r}")
        try:
            self.dtype = np.dtype(self.manifest["dtype"])
            self.vocab_size = int(self.manifest["vocab_size"])
            self.eos_id = int(self.manifest["eos_id"])
            self.splits = {name: info["files"] for name, info in self.manifest["splits"].items()}
            self.manifest["tokenizer"]["file"]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{manifest_path}: damaged manifest ({type(err).__name__}: {err})") from None
        self._arrays: dict[str, list[np.memmap]] = {}

    def arrays(self, split: str) -> list[np.ndarray]:
        if split not in self.splits:
            raise DataError(f"{self.folder}: no {split!r} split (splits: {', '.join(self.splits)})")
        if split not in self._arrays:
            files = self.splits[split]
            arrays = []
            for f in files:
                path = self.folder / f["name"]
                expected = f["tokens"] * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != expected:
                    raise DataError(f"{path}: missing or truncated (expected {expected:,} bytes)")
                if f["tokens"]:
                    arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._arrays[split] = arrays
        return self._arrays[split]

    def num_tokens(self, split: str) -> int:
        return sum(len(a) for a in self.arrays(split))

    def describe(self) -> dict:
        """What a run records about its data: small even when the corpus has many files."""
        sources = self.manifest.get("sources", [])
        return {
            "path": str(self.folder),
            "fingerprint": self.manifest.get("fingerprint"),
            "tokens": {split: info["tokens"] for split, info in self.manifest["splits"].items()},
            "source_files": len(sources),
            "source_bytes": self.manifest.get("source_bytes"),
            "sources": sources if len(sources) <= 8 else sources[:3] + [{"…": f"{len(sources) - 3} more in {MANIFEST}"}],
        }

    def tokenizer(self):
        return load_tokenizer(self.folder / self.manifest["tokenizer"]["file"])

    def sample(self, split: str, batch_size: int, seq_len: int, generator) -> np.ndarray:
        """``(batch_size, seq_len + 1)`` random windows (uniform over start positions),
        drawn with ``generator`` (a ``numpy.random.Generator``)."""
        arrays = [a for a in self.arrays(split) if len(a) > seq_len + 1]
        if not arrays:
            raise DataError(f"{self.folder}: the {split} split has no shard longer than {seq_len + 1} tokens")
        sizes = np.array([len(a) - seq_len - 1 for a in arrays], dtype=np.float64)
        which = generator.choice(len(arrays), size=batch_size, p=sizes / sizes.sum())
        out = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, shard in enumerate(which):
            start = int(generator.integers(0, len(arrays[shard]) - seq_len - 1))
            out[row] = arrays[shard][start : start + seq_len + 1]
        return out

    def check_window(self, split: str, seq_len: int, remedy: str = "") -> None:
        """Raise ``DataError`` unless ``split`` holds at least one window of ``seq_len + 1``
        tokens (what one evaluation or training sequence needs)."""
        if not any(len(a) > seq_len for a in self.arrays(split)):
            raise DataError(f"{self.folder}: the {split} split has no window of {seq_len + 1} tokens "
                            f"({self.num_tokens(split):,} tokens in all)" + (f"; {remedy}" if remedy else ""))

    def sequential(self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """Non-overlapping ``(≤ batch_size, seq_len + 1)`` windows of the split, in order
        (consecutive windows share one boundary token, so every token but the first is
        predicted exactly once). With ``max_batches``, that many batches of windows
        spread evenly over the whole split, so a partial evaluation sees every part of it."""
        positions = [(a, start) for a, array in enumerate(self.arrays(split))
                     for start in range(0, len(array) - seq_len, seq_len)]
        if max_batches is not None and max_batches * batch_size < len(positions):
            picks = np.unique(np.linspace(0, len(positions) - 1, max_batches * batch_size).round().astype(int))
            positions = [positions[i] for i in picks]
        arrays = self.arrays(split)
        for first in range(0, len(positions), batch_size):
            rows = [np.asarray(arrays[a][start : start + seq_len + 1], dtype=np.int64)
                    for a, start in positions[first : first + batch_size]]
            yield np.stack(rows)


# -- the embedded default corpus ----------------------------------------------------------------------


def embedded_corpus() -> Path:
    """The public-domain corpus shipped inside the package (see assets/default/README.md)."""
    return ASSETS / "corpus.jsonl.xz"


def embedded_shards(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Token shards of the embedded corpus with the embedded tokenizer, built once into
    a cache folder keyed by the corpus and tokenizer hashes."""
    corpus, tokenizer = embedded_corpus(), ASSETS / "tokenizer.json"
    # The key covers the inputs and the format: a cache from another version is not reused.
    key = hashlib.sha256(FORMAT.encode() + b"/ids-relative/" + corpus.read_bytes() + tokenizer.read_bytes()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("FINEMOE_CACHE", Path.home() / ".cache" / "finemoe"))
    folder = root / f"default-{key}"
    if not (folder / MANIFEST).is_file():
        build_shards([corpus], folder, tokenizer_path=tokenizer, val_fraction=0.02, progress=progress, overwrite=True)
    return folder
