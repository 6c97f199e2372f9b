#!/usr/bin/env bash
# Issue-5 real runs: train s20m variants on the prose pack, then `finemoe analyze` them.
#   bash tools/analysis_runs.sh OUT_DIR dense   # s20m, s20m-finedeep, s20m-dsmoe
#   bash tools/analysis_runs.sh OUT_DIR routed  # s20m-moe, s20m-moe-fine, s20m-cartesian, s20m-peer, s20m-pkm
set -uo pipefail
OUT=${1:?output folder}; GROUP=${2:?dense or routed}; STEPS=${STEPS:-600}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/runs" "$OUT/analysis"
if [ "$GROUP" = dense ]; then PRESETS="s20m s20m-finedeep s20m-dsmoe"; COMPILE=true
else PRESETS="s20m-moe s20m-moe-fine s20m-cartesian s20m-peer s20m-pkm"; COMPILE=false; fi
RUNS=""
for p in $PRESETS; do
    start=$(date +%s)
    python3 -m finemoe.cli train -c "$p" --data .data/prose --out "/tmp/ar-$p" train.steps="$STEPS" \
        train.warmup_steps=60 train.eval_every=200 train.checkpoint_every=100000 train.compile=$COMPILE 2>&1 \
        | tr '\r' '\n' | grep -E '^(s20m|done|error)'
    echo "$p: $(( $(date +%s) - start )) s" | tee -a "$OUT/wall.txt"
    mkdir -p "$OUT/runs/$p"; cp /tmp/ar-$p/{metrics.jsonl,summary.json,config.yaml,environment.json} "$OUT/runs/$p/"
    RUNS="$RUNS /tmp/ar-$p"
done
labels=$(echo $PRESETS | sed 's/s20m-//g; s/^s20m /dense /; s/ /,/g')
python3 -m finemoe.cli analyze $RUNS --labels "$labels" --out "$OUT/analysis" --data .data/prose --batches 40 \
    --batch-size 32 --evals-dir .data/evals --sources hellaswag,piqa,arc_easy,sciq,lambada --limit 500 2>&1 \
    | tr '\r' '\n' | grep -v -E '^analyze'
tar -czf "$OUT/$GROUP.tar.gz" -C "$OUT" runs analysis wall.txt && rm -rf "$OUT/runs" "$OUT/analysis" "$OUT/wall.txt"
ls -la "$OUT"
