#!/usr/bin/env bash
# Two CPU processes on gloo (what tests/test_train_e2e.py::test_two_processes_gloo runs).
#   scripts/train_cpu_two_ranks.sh configs/demo/topd.yaml train.steps=5
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [overrides...]}; shift
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run --nproc_per_node 2 -m topd_ds.train --config "$config" "$@"
