"""Build the corpus and tokenizer embedded in finemoe (finemoe/assets/default/).

Takes the public-domain sources of the shared prose pack (State of the Union addresses,
Moby-Dick, Shakespeare, Milton; not the GPL kernel docs nor the fortunes, whose
copyright was never cleared), from its train and val files, and trains an 8,192-token
byte-level BPE on them. Deterministic: the same pack gives the same files.

    python tools/build_default_corpus.py ../shared/data/prose
"""

import json
import lzma
import sys
from pathlib import Path

from finemoe.data import train_bpe_tokenizer

KEEP = ("sotu", "moby_dick", "shakespeare", "milton")
OUT = Path(__file__).resolve().parents[1] / "finemoe" / "assets" / "default"


def main(pack: str) -> None:
    docs = []
    for split in ("train", "val"):
        with lzma.open(Path(pack) / f"{split}.jsonl.xz", "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                if d["source"] in KEEP:
                    docs.append({"id": d["id"], "source": d["source"], "text": d["text"]})
    docs.sort(key=lambda d: d["id"])
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "corpus.jsonl.xz").write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    tokenizer = train_bpe_tokenizer((d["text"] for d in docs), 8192)
    tokenizer.save(str(OUT / "tokenizer.json"))
    print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/prose")
