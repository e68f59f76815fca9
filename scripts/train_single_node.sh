#!/usr/bin/env bash
# One node: the trainer's DeepSpeed ranks on TRAIN_GPUS, the inference servers on the other GPUs.
#
#   TRAIN_GPUS=4,5,6,7 scripts/train_single_node.sh configs/qwen3_30b_a3b_to_4b/topd.yaml [key.path=value ...]
#
# The GPU plan of one 8-GPU node (docs/DEEPSPEED.md): student SGLang on GPUs 0,1, teacher SGLang on GPUs 2,3
# (scripts/launch_sglang.sh, URLs in the YAML), trainer on GPUs 4,5,6,7 (the default here). One rank per GPU
# in TRAIN_GPUS; ranks x train.micro_batch_size x gradient accumulation must equal train.global_batch_size
# (the shipped configs: 4 ranks x 1 x 1 = 4 for stage 2; stage 1 with sequence parallelism 2: 2 groups of 2 ranks
# x micro-batch 2 x 32 = 128); a mismatch stops the
# run with one line before any model is loaded.
#
# Environment:
#   TRAIN_GPUS    comma-separated GPU ids for the trainer (default 4,5,6,7). DeepSpeed's --include pins the
#                 ranks to exactly these ids; CUDA_VISIBLE_DEVICES is ignored by the launcher when --include
#                 is given, so never rely on it here.
#   MASTER_PORT   torch.distributed port (default 29500; change it to run two jobs on one node)
#   DEEPSPEED     the launcher program (default: deepspeed on PATH)
# With DS_ACCELERATOR=cpu the ids name CPU processes (gloo), e.g. TRAIN_GPUS=0,1: what CI runs.
# A role with no URL in the YAML gets a built-in server started by rank 0 (fine on CPU, slow for real models).
set -euo pipefail
config=${1:?usage: TRAIN_GPUS=4,5,6,7 $0 CONFIG.yaml [key.path=value ...]}; shift
train_gpus=${TRAIN_GPUS:-4,5,6,7}
[[ "$train_gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "$0: TRAIN_GPUS must be comma-separated ids, got '$train_gpus'" >&2; exit 2; }
n_ranks=$(tr ',' '\n' <<<"$train_gpus" | wc -l)
if [[ "${DS_ACCELERATOR:-}" == cpu ]]; then
  # DeepSpeed's CPU accelerator counts one "device" per NUMA node unless LOCAL_SIZE says how many slots exist
  max_id=$(tr ',' '\n' <<<"$train_gpus" | sort -n | tail -1)
  export LOCAL_SIZE=${LOCAL_SIZE:-$((max_id + 1))}
fi
echo "train_single_node.sh: $n_ranks trainer rank(s) on GPU(s) $train_gpus (TRAIN_GPUS); servers must use the others" >&2
exec "${DEEPSPEED:-deepspeed}" --include "localhost:$train_gpus" --master_port "${MASTER_PORT:-29500}" \
  --module topd_ds.train --config "$config" "$@"
