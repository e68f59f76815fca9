#!/usr/bin/env bash
# Several nodes: the trainer's DeepSpeed ranks on TRAIN_GPUS of every host in the hostfile, the inference
# servers on the other GPUs of each node. Run it on the first node.
#
#   HOSTFILE=hostfile MASTER_ADDR=node0 TRAIN_GPUS=4,5,6,7 scripts/train_multi_node.sh CONFIG.yaml [key=value ...]
#
# hostfile: one line per node, "HOST slots=8" (DeepSpeed's format); passwordless ssh from the first node to
# every host (DeepSpeed's pdsh launcher). The ranks are pinned with --include HOST:TRAIN_GPUS@HOST:TRAIN_GPUS...,
# so N nodes give N x len(TRAIN_GPUS) ranks, and ranks x train.micro_batch_size x accumulation must equal
# train.global_batch_size (N nodes of the shipped stage-2 plan: rollout.prompts_per_step=N,
# train.global_batch_size=4N; docs/DEEPSPEED.md). Every node needs the same checkout, venv and paths (models,
# data, and the run dir on a shared filesystem: checkpoints and weight-sync directories are written by the
# ranks and read by the servers); `.deepspeed_env` in the home directory passes extra variables to all nodes.
#
# Environment:
#   HOSTFILE     the hostfile (default ./hostfile)
#   TRAIN_GPUS   GPU ids used for training on every node (default 4,5,6,7)
#   MASTER_ADDR  address of the first node, reachable from all (required with several hosts; 127.0.0.1 with one)
#   MASTER_PORT  torch.distributed port (default 29500)
#   DEEPSPEED    the launcher program (default: deepspeed on PATH)
# A hostfile with a single host runs locally without ssh (CI: "localhost slots=2", TRAIN_GPUS=0,1,
# DS_ACCELERATOR=cpu).
set -euo pipefail
config=${1:?usage: HOSTFILE=hostfile MASTER_ADDR=node0 $0 CONFIG.yaml [key.path=value ...]}; shift
hostfile=${HOSTFILE:-hostfile}
[ -f "$hostfile" ] || { echo "$0: hostfile not found: $hostfile (HOSTFILE)" >&2; exit 2; }
train_gpus=${TRAIN_GPUS:-4,5,6,7}
[[ "$train_gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "$0: TRAIN_GPUS must be comma-separated ids, got '$train_gpus'" >&2; exit 2; }
mapfile -t hosts < <(sed -e 's/#.*//' "$hostfile" | awk 'NF {print $1}')
((${#hosts[@]})) || { echo "$0: $hostfile lists no host" >&2; exit 2; }
include=$(printf "%s:$train_gpus@" "${hosts[@]}"); include=${include%@}
extra=()
if ((${#hosts[@]} == 1)); then
  master_addr=${MASTER_ADDR:-127.0.0.1}
  extra+=(--no_ssh_check)  # one host: DeepSpeed launches locally, ssh is never used
else
  master_addr=${MASTER_ADDR:?set MASTER_ADDR to the first node\'s address}
fi
n_ranks=$(( ${#hosts[@]} * $(tr ',' '\n' <<<"$train_gpus" | wc -l) ))
echo "train_multi_node.sh: $n_ranks trainer rank(s): GPU(s) $train_gpus on ${#hosts[@]} host(s) (${hosts[*]})" >&2
exec "${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --include "$include" "${extra[@]}" \
  --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  --module topd_ds.train --config "$config" "$@"
