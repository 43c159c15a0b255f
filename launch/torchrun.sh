#!/usr/bin/env bash
# Several processes on one machine:   launch/torchrun.sh [NPROC] [hydra overrides...]
# NPROC defaults to the number of GPUs (or 2 on a CPU-only machine). Example:
#   launch/torchrun.sh 2 train.zero_stage=2 hydra.run.dir=runs/ddp-demo
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; else
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)"); fi
# Ctrl-C / SIGTERM: torchrun forwards it, the ranks checkpoint and exit; torchrun waits up to
# SHUTDOWN_TIMEOUT s (default 600; its own default, 30, can cut a large checkpoint short) and then
# exits non-zero even after a clean checkpoint.
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}" -m newtonlm.training.train "$@"
