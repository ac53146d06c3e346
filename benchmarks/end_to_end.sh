#!/usr/bin/env bash
# The README's main command as a new user meets it: a fresh clone, setup, then
# examples/end_to_end.py twice: cold (empty qft cache) and warm (error table cached).
#
#   bash benchmarks/end_to_end.sh            # prints the seconds of each stage; run from the repository
#
# The clone and its cache live in a temporary folder that is removed at the end.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/qft"
cd "$work/qft"
export QFT_CACHE="$work/cache"
start=$(date +%s)
bash .ci/setup > "$work/setup.log" 2>&1
setup=$(( $(date +%s) - start ))
echo "setup: ${setup} s"
for run in cold warm; do
    start=$(date +%s)
    .venv/bin/python examples/end_to_end.py --quiet --out "$work/run-$run" | tee "$work/$run.log"
    echo "$run run: $(( $(date +%s) - start )) s (python, after setup)"
done
