#!/usr/bin/env bash
# One node, N GPUs (default: all visible), DeepSpeed launcher.
#   scripts/train_single_node.sh configs/qwen3_30b_a3b_to_4b/topd.yaml [key.path=value ...]
# The student and teacher servers must already run (scripts/launch_sglang.sh) and be named in the YAML;
# a role with no URL gets a built-in server started by rank 0 (fine on CPU, slow for real models).
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [overrides...]}; shift
gpus=${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec deepspeed --num_gpus "$gpus" -m topd_ds.train --config "$config" "$@"
