#!/usr/bin/env bash
# Build llama.cpp from source, CPU only, as an independent reader of GGUF files.
#
# Why: qft writes and reads GGUF through its own code; llama.cpp is the reference
# reader, and its own quantizations (Q4_K_M, Q3_K_M, Q2_K) are the peers that qft's
# quantizers are measured against (benchmarks/llama_cpp.py).
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist (pinned
# version below), so the build does not need git or network access beyond PyPI.
# Only the tools used are built: llama-perplexity, llama-quantize, llama-completion, llama-bench,
# llama-imatrix
# (in this llama.cpp, llama-cli sits behind LLAMA_BUILD_SERVER and the HTTP server,
# llama-completion is the plain command-line generator).
#
# Result, cached (a second run only prints the paths):
#   benchmarks/out/llama.cpp/             the llama.cpp source tree
#   benchmarks/out/llama.cpp/build/bin/   llama-perplexity, llama-quantize, llama-completion, llama-bench,
#                                         llama-imatrix
#   benchmarks/out/llama.cpp/convert_hf_to_gguf.py, convert_lora_to_gguf.py
#                                         (they put .../gguf-py on sys.path themselves)
#   benchmarks/out/pydeps/                sentencepiece, when the Python lacks it (the
#                                         convert script needs it for Llama models)
#
# Env: PYTHON (default: .venv/bin/python of the repo, else python3),
#      LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 2),
#      SDIST_DIR (where the sdist is looked for / downloaded; default /tmp/dl).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/benchmarks/out"
SRC="$OUT/llama.cpp"
BUILD="$SRC/build"
BIN="$BUILD/bin"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
SDIST_DIR="${SDIST_DIR:-/tmp/dl}"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
TARGETS=(llama-perplexity llama-quantize llama-completion llama-bench llama-imatrix)
STAMP="$BUILD/.qft-built-$VERSION"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

report() {
    echo "llama.cpp (llama-cpp-python $VERSION vendored tree): $SRC"
    for t in "${TARGETS[@]}"; do echo "  $BIN/$t"; done
    echo "  $SRC/convert_hf_to_gguf.py"
    echo "  $SRC/convert_lora_to_gguf.py   (they find $SRC/gguf-py themselves;"
    echo "                                   PYTHONPATH=$PYDEPS if sentencepiece is missing)"
    [[ -f "$BUILD/.qft-build-seconds" ]] && echo "  build took $(cat "$BUILD/.qft-build-seconds") s"
    return 0
}

built() {
    [[ -f "$STAMP" ]] || return 1
    for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

# convert_hf_to_gguf.py imports sentencepiece for Llama-family models even when the
# model has no tokenizer.model; put it beside the build (not into the venv) if missing.
PYDEPS="$OUT/pydeps"
if ! "$PYTHON" -c "import sentencepiece" 2>/dev/null && [[ ! -d "$PYDEPS/sentencepiece" ]]; then
    "$PYTHON" -m pip install --quiet --target "$PYDEPS" "sentencepiece>=0.1.98,<0.3.0" \
        || echo "warning: sentencepiece not installed; convert_hf_to_gguf.py will fail on Llama models" >&2
fi

if built; then
    report
    exit 0
fi

mkdir -p "$OUT"

# 1. the source: vendor/llama.cpp of the sdist
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    if [[ ! -f "$SDIST" ]]; then
        mkdir -p "$SDIST_DIR"
        "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
    fi
    tmp="$(mktemp -d "$OUT/.llama.cpp-extract.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    tar xzf "$SDIST" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
fi

# 2. configure + build: Release, CPU only, static, no network clients, no tests/examples/server
start=$(date +%s)
cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
end=$(date +%s)
echo $((end - start)) > "$BUILD/.qft-build-seconds"

built_ok=1
for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || { echo "missing after build: $BIN/$t" >&2; built_ok=0; }; done
[[ $built_ok == 1 ]] || exit 1
touch "$STAMP"
report
