#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher (passwordless ssh between nodes, same checkout and
# .venv path on every node):
#   launch/deepspeed_hostfile.sh HOSTFILE [hydra overrides...]
# HOSTFILE lines: "<hostname> slots=<processes on that host>" (see launch/hostfile.example).
# GPUS_PER_NODE (default: the hostfile's slots) is passed as --num_gpus because on CPU-only hosts the
# launcher would otherwise count NUMA nodes as devices. Pick a run dir shared by all nodes, e.g.
#   launch/deepspeed_hostfile.sh launch/hostfile model=paragru_1b train=cluster hydra.run.dir=/shared/runs/gru1b
set -euo pipefail
cd "$(dirname "$0")/.."
# HOSTFILE "local" runs on this machine only (no ssh), GPUS_PER_NODE processes (default 2):
#   launch/deepspeed_hostfile.sh local train.zero_stage=2
HOSTFILE=${1:?usage: launch/deepspeed_hostfile.sh HOSTFILE|local [overrides...]}; shift
DS=${DS:-.venv/bin/deepspeed}
if [ "$HOSTFILE" = local ]; then
    exec "$DS" --num_gpus "${GPUS_PER_NODE:-2}" --master_port "${MASTER_PORT:-29500}" \
        --no_local_rank --module newtonlm.training.train "$@"
fi
SLOTS=$(awk '/slots=/{sub(/.*slots=/, ""); print $1; exit}' "$HOSTFILE")
exec "$DS" --hostfile "$HOSTFILE" --num_gpus "${GPUS_PER_NODE:-$SLOTS}" \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank --module newtonlm.training.train "$@"
