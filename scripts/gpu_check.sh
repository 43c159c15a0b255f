#!/usr/bin/env bash
# Validate the Triton kernels on a CUDA GPU and record the kernel benchmark.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (writes gpu_tests.log, kernels_bench.json, kernels_bench.txt)
set -uo pipefail
OUT=${1:-${OUT:-gpu_results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
VENV=${VENV:-.venv} scripts/setup_venv.sh || exit 1
PY=${VENV:-.venv}/bin/python
nvidia-smi -L | tee "$OUT/gpu.txt"
NEWTONLM_TEST_GPU=1 timeout 300 "$PY" -m pytest -q -x tests/test_triton_scan.py tests/test_triton_fused.py \
    2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 "$PY" -m newtonlm.kernels.bench --json --baseline-max-T 4096 > "$OUT/kernels_bench.json"
"$PY" - "$OUT/kernels_bench.json" > "$OUT/kernels_bench.txt" <<'PY'
import json, sys
from newtonlm.kernels.bench import format_table
r = json.load(open(sys.argv[1]))
print(format_table(r["rows"])); print(r["machine"])
PY
cat "$OUT/kernels_bench.txt"
