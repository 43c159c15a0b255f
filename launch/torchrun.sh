#!/usr/bin/env bash
# Several processes on one machine:   launch/torchrun.sh [NPROC] [hydra overrides...]
# NPROC defaults to the number of GPUs (or 2 on a CPU-only machine). Example:
#   launch/torchrun.sh 2 train.zero_stage=2 hydra.run.dir=runs/ddp-demo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; else
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)"); fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m newtonlm.training.train "$@"
