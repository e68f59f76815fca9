#!/usr/bin/env bash
# Several nodes with a DeepSpeed hostfile (one line per node: "host slots=8"); run it on the first node.
#   HOSTFILE=hostfile MASTER_ADDR=node0 scripts/train_multi_node.sh configs/qwen3_30b_a3b_to_4b/topd.yaml
# Every node needs the same checkout, venv and paths (models, data, run dir on a shared filesystem:
# checkpoints and the weight-sync directory are written by all ranks and read by the servers).
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [overrides...]}; shift
hostfile=${HOSTFILE:-hostfile}
[ -f "$hostfile" ] || { echo "$0: hostfile not found: $hostfile" >&2; exit 2; }
exec deepspeed --hostfile "$hostfile" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
  --master_port "${MASTER_PORT:-29500}" -m topd_ds.train --config "$config" "$@"
