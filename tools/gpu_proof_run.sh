#!/usr/bin/env bash
# The issue-4 proof run: the ~20M dense preset on the prose pack on one GPU, then
# zero-shot evaluation and a sample. Run from the repository root on a GPU machine:
#   finemoe data ../shared/data/prose/train.jsonl.xz --val-input ../shared/data/prose/val.jsonl.xz \
#       --vocab-size 16384 -o .data/prose          # once, anywhere
#   bash tools/gpu_proof_run.sh OUT_DIR [extra overrides...]
set -uo pipefail
OUT=${1:?output folder}; shift
RUN=/tmp/finemoe-s20m
export PYTHONUNBUFFERED=1
rm -rf "$RUN"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
START=$(date +%s)
# the training command (killed at 450 s so that a slow machine still leaves its metrics)
timeout 450 python3 -m finemoe.cli train -c s20m --data .data/prose --out "$RUN" train.compile=true "$@" 2>&1 \
    | tr '\r' '\n' | grep -v '^train: ' | tee "$OUT/train.log"
echo "wall seconds: $(( $(date +%s) - START ))" | tee -a "$OUT/train.log"
python3 -m finemoe.cli eval "$RUN" --data .data/prose --evals-dir .data/evals --batch-size 64 --limit 1000 \
    --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande,sciq,copa,lambada --output "$OUT/eval.json" 2>&1 \
    | tr '\r' '\n' | grep -v -E '^(scoring|eval val)' | tee "$OUT/eval.log"
python3 -m finemoe.cli generate "$RUN" -p "The President of the United States" --max-new-tokens 80 \
    --num-samples 2 --seed 0 > "$OUT/samples.txt" 2>&1
cp "$RUN"/{metrics.jsonl,summary.json,environment.json,config.yaml} "$OUT/" 2>/dev/null
ls -la "$OUT"
