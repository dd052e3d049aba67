#!/usr/bin/env bash
# Same-run comparison with transformers on one machine: `vigil bench` at real shapes with random
# weights, then tests/reference/bench_transformers.py on the very same weights, frames, prompts
# and batches; prints both sets of figures and the ratios.
#
#   scripts/bench-vs-transformers.sh OUT_DIR --shape 2b --random-weights --device cuda [bench args]
#
# OUT_DIR receives weights/ (the random checkpoint, re-used by later runs), vigil.json,
# transformers.json and comparison.txt. VIGIL (default target/release/vigil) and PYTHON
# (default python3, with torch and transformers) pick the programs.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,11p' "$0"; exit 2; }
out=$1
shift
VIGIL=${VIGIL:-target/release/vigil}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
"$VIGIL" bench --save-weights "$out/weights" --json "$@" > "$out/vigil.json"
"$PYTHON" "$here/tests/reference/bench_transformers.py" --vigil "$out/vigil.json" --json "$out/transformers.json" \
  | tee "$out/comparison.txt"
