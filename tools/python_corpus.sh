#!/usr/bin/env bash
# The larger corpus of the study (issue 6), built on the machine that trains: every .py file
# of this interpreter's installed packages, exact duplicates (vendored copies) dropped, a 16k
# byte-level BPE trained on it, 2% of the files held out for validation. `finemoe data` prints
# the fingerprint (sha256 of tokenizer + shards) that the runs record.
#   bash tools/python_corpus.sh OUT_DIR
set -euo pipefail
OUT=${1:?output folder}
SRC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "python $(python3 -c 'import sys; print(sys.version.split()[0])'), sources: $SRC"
python3 -m finemoe.cli data "$SRC" --glob '**/*.py' --skip-invalid --dedupe --vocab-size 16384 \
    --val-fraction 0.02 -o "$OUT" 2>&1 | tr '\r' '\n' | grep -v '^tokenizing'
