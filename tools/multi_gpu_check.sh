#!/usr/bin/env bash
# Issue-4 multi-GPU check: the s20m preset for 300 steps on 1 GPU (batch 32) and on
# 2 GPUs with torchrun (batch 16 each, the same global batch), with FSDP2 and with DDP.
#   bash tools/multi_gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?output folder}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="-c s20m --data .data/prose train.steps=300 train.warmup_steps=30 train.eval_every=100 train.eval_batches=40 train.checkpoint_every=300 train.log_every=10"
run() {  # name nproc batch parallel
    local start=$(date +%s)
    torchrun --standalone --nproc_per_node "$2" -m finemoe.cli train $COMMON --out "/tmp/mg-$1" \
        train.batch_size="$3" train.parallel="$4" 2>&1 | tr '\r' '\n' | grep -v '^train: ' | tail -3
    echo "$1: $(( $(date +%s) - start )) s" | tee -a "$OUT/wall.txt"
    cp "/tmp/mg-$1/metrics.jsonl" "$OUT/metrics_$1.jsonl"
}
run 1gpu 1 32 fsdp
run 2gpu_fsdp 2 16 fsdp
run 2gpu_ddp 2 16 ddp
