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
# ranks and read by the servers).
#
# The environment over ssh: pdsh starts every node's ranks (rank 0 too) in a fresh ssh environment. DeepSpeed's
# runner forwards only NCCL*, PYTHON*, MLFLOW*, MV2*, UCX* and the KEY=VALUE lines of a `.deepspeed_env` file
# (deepspeed/launcher/runner.py:36-38, 598-611 in 0.19.8; DS_ENV_FILE names that file, an absolute path is read
# as is). With several hosts this script writes such a file (mode 600, removed at exit): the lines of
# ~/.deepspeed_env and ./.deepspeed_env, then every variable named TOPD_* (TOPD_API_KEY), HF_*, TRANSFORMERS_*,
# TOKENIZERS_*, TORCH_*, TRITON_*, OMP_*, DS_* and those listed in FORWARD_ENV, so the ranks see what this shell
# sees. A value with $ ` " \ or a newline stops it with one line (the remote shell would expand it).
# MASTER_ADDR must be the hostfile's first host (or resolve to one of its addresses): rank 0 runs there and
# hosts the rendezvous; anything else stops with one line.
#
# Environment:
#   HOSTFILE     the hostfile (default ./hostfile)
#   TRAIN_GPUS   GPU ids used for training on every node (default 4,5,6,7)
#   MASTER_ADDR  address of the first node, reachable from all (required with several hosts; 127.0.0.1 with one)
#   MASTER_PORT  torch.distributed port (default 29500)
#   DEEPSPEED    the launcher program (default: deepspeed on PATH)
#   FORWARD_ENV  more variable names to pass to every node, space-separated
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
  addresses() { getent ahosts "$1" 2>/dev/null | awk '{print $1}' | sort -u; }
  if [[ "$master_addr" != "${hosts[0]}" ]] && \
     ! comm -12 <(addresses "$master_addr") <(addresses "${hosts[0]}") | grep -q .; then
    echo "$0: MASTER_ADDR=$master_addr is not $hostfile's first host ${hosts[0]}, where rank 0 runs and hosts the rendezvous: set MASTER_ADDR=${hosts[0]} (or an address of it)" >&2
    exit 2
  fi
  env_file=$(umask 077 && mktemp "${TMPDIR:-/tmp}/topd-ds-env.XXXXXX")
  trap 'rm -f "$env_file"' EXIT
  for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do [ -f "$f" ] && { grep '=' "$f" || true; } >>"$env_file"; done
  for name in $(compgen -e | grep -E '^(TOPD_|HF_|TRANSFORMERS_|TOKENIZERS_|TORCH_|TRITON_|OMP_|DS_)' | grep -vx DS_ENV_FILE) \
              ${FORWARD_ENV:-}; do
    value=${!name-}
    if [[ "$value" == *[\$\`\"\\]* || "$value" == *$'\n'* ]]; then
      echo "$0: $name holds a character (\$ \` \" \\ or a newline) that the nodes' shell would expand; pdsh cannot pass it" >&2
      exit 2
    fi
    printf '%s=%s\n' "$name" "$value" >>"$env_file"
  done
  export DS_ENV_FILE=$env_file
fi
n_ranks=$(( ${#hosts[@]} * $(tr ',' '\n' <<<"$train_gpus" | wc -l) ))
echo "train_multi_node.sh: $n_ranks trainer rank(s): GPU(s) $train_gpus on ${#hosts[@]} host(s) (${hosts[*]})" >&2
launch=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --include "$include" "${extra[@]}"
        --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" --module topd_ds.train --config "$config" "$@")
((${#hosts[@]} == 1)) && exec "${launch[@]}"
"${launch[@]}"   # not exec: the EXIT trap removes the environment file (it may hold TOPD_API_KEY)
