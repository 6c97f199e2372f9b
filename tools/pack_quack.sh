#!/usr/bin/env bash
# QuACK (experts_impl: quack) for a GPU machine with no package registry: the pinned wheels
# for CPython 3.12 on x86-64 Linux, unpacked into one folder, packed as an xz tarball and
# split into two parts under .whl/ and .whl2/ (both ignored by git), each small enough to
# travel with the working tree in one call of the device tool (64 MiB a call).
#
#   tools/pack_quack.sh
#
# There: copy part 1 somewhere in one call, then in the next
#   cat <part 1> .whl2/quack.tar.xz.part.ab | xz -d | tar x -C /tmp/q
#   export PYTHONPATH=/tmp/q/site:/tmp/q/site/nvidia_cutlass_dsl/dsl_packages:$PWD
# (the second path is what the DSL's .pth file would add in a real install).
# Versions: quack-kernels 0.6.0 pins nvidia-cutlass-dsl 4.6.0; 0.6.5 failed with the DSL
# 4.7.1 and 4.8.1 (benchmarks/NOTES.md). libs-cu13 for CUDA 13 drivers; protobuf >= 6.30
# is what the DSL asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
platform=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download --quiet "${platform[@]}" -d "$work/wheels" \
    quack-kernels==0.6.0 nvidia-cutlass-dsl==4.6.0 nvidia-cutlass-dsl-libs-base==4.6.0 \
    nvidia-cutlass-dsl-libs-core==4.6.0 nvidia-cutlass-dsl-libs-cu13==4.6.0 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 "protobuf>=6.30.2,<7"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/site"
done
tar cf - -C "$work" site | xz -T0 -7 > "$work/quack.tar.xz"
mkdir -p .whl .whl2
rm -f .whl/quack.tar.xz.part.* .whl2/quack.tar.xz.part.*
split -b 34000000 "$work/quack.tar.xz" "$work/quack.tar.xz.part."
if [ -e "$work/quack.tar.xz.part.ac" ]; then
    echo "the tarball no longer fits in two parts: carry a third" >&2; exit 1
fi
mv "$work/quack.tar.xz.part.aa" .whl/
mv "$work/quack.tar.xz.part.ab" .whl2/
rm -rf "$work"
ls -l .whl/quack.tar.xz.part.* .whl2/quack.tar.xz.part.*
