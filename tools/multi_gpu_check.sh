#!/usr/bin/env bash
# Issue-4 multi-GPU check: the s20m preset for 300 steps on 1 GPU (batch 32) and on
# 2 GPUs with torchrun (batch 16 each, the same global batch), with FSDP2 and with DDP.
#   bash tools/multi_gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?output folder}; mkdir -p "$OUT"
ONLY=${2:-all}   # "all", "curves", "throughput" or "float32"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="-c s20m --data .data/prose train.steps=300 train.warmup_steps=30 train.eval_every=100 train.eval_batches=40 train.checkpoint_every=300 train.log_every=10"
run() {  # name nproc batch parallel [extra overrides]
    local start=$(date +%s)
    torchrun --standalone --nproc_per_node "$2" -m finemoe.cli train $COMMON --out "/tmp/mg-$1" \
        train.batch_size="$3" train.parallel="$4" "${@:5}" 2>&1 | tr '\r' '\n' | grep -v '^train: ' | tail -3
    echo "$1: $(( $(date +%s) - start )) s" | tee -a "$OUT/wall.txt"
    cp "/tmp/mg-$1/metrics.jsonl" "$OUT/metrics_$1.jsonl"
}
if [ "$ONLY" = float32 ]; then
# Without bf16 autocast the curves must agree to float32 rounding (no numerical noise to hide behind).
COMMON="$COMMON train.dtype=float32 train.steps=150"
run f32_1gpu 1 32 fsdp
run f32_2gpu_fsdp 2 16 fsdp
run f32_2gpu_ddp 2 16 ddp
run 2gpu_ddp_again 2 16 ddp train.dtype=bfloat16 train.steps=300
exit 0
fi
if [ "$ONLY" != throughput ]; then
run 1gpu 1 32 fsdp
run 2gpu_fsdp 2 16 fsdp
run 2gpu_ddp 2 16 ddp
# Reference for bf16 noise: one GPU, the same global batch as 2 × 16 by gradient accumulation.
run 1gpu_accum2 1 16 fsdp train.grad_accum=2
fi
if [ "$ONLY" != curves ]; then
# Throughput of a larger model (s120m, 113M parameters), 60 steps each.
COMMON="-c s120m --data .data/prose train.steps=60 train.warmup_steps=5 train.eval_batches=0 train.checkpoint_every=1000 train.log_every=10"
run 120m_1gpu 1 32 fsdp
run 120m_2gpu_fsdp 2 16 fsdp
run 120m_2gpu_ddp 2 16 ddp
fi
