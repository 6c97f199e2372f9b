#!/usr/bin/env bash
# Studies side by side on one GPU machine (the device tool). Each argument is the argument
# list of one `finemoe study` command; each runs in its own process on the same GPU (the
# s20m arms leave most of an H100 idle, so two or three at once finish sooner; their wall
# times are then shared-GPU times). Studies whose arguments name $PYCORPUS wait for the
# Python-source corpus (tools/python_corpus.sh) to be built there first. Everything is
# stopped DEADLINE seconds after the start; an arm stopped part-way continues from its last
# checkpoint when the study is run again. What the studies wrote (checkpoints excluded)
# and their logs go to OUT.
#   DEADLINE=540 bash tools/device_studies.sh "$OUT" \
#       'cartesian --out results/study_cartesian/runs data.path=.data/prose train.steps=1000' \
#       'finedeep --out results/study_finedeep/python data.path=/tmp/pycorpus'
set -uo pipefail
OUT=${1:?output folder}; shift
DEADLINE=${DEADLINE:-540}; PYCORPUS=${PYCORPUS:-/tmp/pycorpus}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
launch() {  # $1: index, $2: study arguments
    local name=${2%% *}
    echo "[$(( $(date +%s) - start )) s] start: finemoe study $2"
    timeout -k 15 "$(left)" python3 -m finemoe.cli study $2 --evals-dir .data/evals > "$OUT/$1-$name.log" 2>&1 &
}
i=0; deferred=()
for args in "$@"; do
    i=$((i + 1))
    if [[ "$args" == *"$PYCORPUS"* ]]; then deferred+=("$i:$args"); else launch "$i" "$args"; fi
done
if [ ${#deferred[@]} -gt 0 ]; then
    if [ ! -f "$PYCORPUS/manifest.json" ]; then
        timeout "$(left)" bash tools/python_corpus.sh "$PYCORPUS" > "$OUT/corpus.log" 2>&1
        echo "[$(( $(date +%s) - start )) s] corpus: $(tail -4 "$OUT/corpus.log" | tr '\n' ' ')"
    fi
    for item in "${deferred[@]}"; do launch "${item%%:*}" "${item#*:}"; done
fi
wait
echo "[$(( $(date +%s) - start )) s] all stopped"
for log in "$OUT"/*.log; do echo "== $log"; tr '\r' '\n' < "$log" | grep -E '^\[study|Error|error|Traceback|rror:' | tail -12; done
tar czf "$OUT/studies.tgz" --exclude='*.pt' --exclude=tensorboard --exclude=checkpoints results/study_*
ls -la "$OUT"
