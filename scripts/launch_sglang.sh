#!/usr/bin/env bash
# Launch the two real SGLang servers a topd-ds run talks to: the student (rollouts, probing; its
# weights are replaced every step through /update_weights_from_disk) and the teacher (scoring;
# top-k logprobs and, when the loss needs full-vocabulary teacher logits, final hidden states).
#
#   scripts/launch_sglang.sh student --model DIR [--port 30000] [--tp 1] [--dp 1] [--gpus 0]
#   scripts/launch_sglang.sh teacher --model DIR [--port 30001] [--tp 1] [--mem 0.80] [--gpus 1]
#
# Run from the repository root, with SGLang's own environment (docs/INSTALL.md): SGLANG_PYTHON names its
# python (default: python on PATH).
#
# Options (each also an environment variable):
#   --model DIR     HF model directory or hub id                         (MODEL)
#   --port N        HTTP port; student 30000, teacher 30001 by default  (PORT)
#   --host H        bind address, default 127.0.0.1; use 0.0.0.0 only behind a firewall (HOST)
#   --tp N          tensor parallel size                                  (TP)
#   --dp N          data parallel replicas inside this server (DP); the student's weights then go by
#                   train.weight_sync: disk (SGLang refuses in-memory updates with dp > 1; topd-ds checks at start)
#   --mem F         --mem-fraction-static: GPU memory share for weights + KV cache (MEM); student default:
#                   not passed (SGLang sizes it for a GPU of its own), teacher default 0.80 (room for the
#                   activations of whole-sequence prefills with hidden states)
#   --gpus LIST     CUDA_VISIBLE_DEVICES for this server                  (GPUS)
#   --api-key KEY   require "Authorization: Bearer KEY" (give the same key to the trainer) (API_KEY)
#   --memory-saver  pass --enable-memory-saver (lets a server release its GPU memory on request); only for
#                   GPUs shared with other work. topd-ds never shares them (the trainer gets GPUs of its own,
#                   docs/DEEPSPEED.md) and never asks a server to release memory, so the default is off
#   --no-memory-saver   the default; accepted for older command lines
#   --deterministic pass --enable-deterministic-inference (seeded, batch-invariant sampling; slower)
#   --scoring MODE  teacher only: the trainer's teacher.scoring. local (default, the paper configs): the
#                   teacher samples, probes and answers top-k logprobs; no extra flags. server: the trainer asks
#                   it for hidden states, so it gets --enable-return-hidden-states --chunked-prefill-size -1
#   --dry-run       print the command instead of running it
# Anything after `--` goes to sglang.launch_server unchanged.
#
# With --scoring server the teacher gets --enable-return-hidden-states so that
# return_hidden_states works (SGLang refuses it otherwise; REQUIRED for teacher.scoring: server with
# opd.estimator: full or stage 1's KD term, and the trainer checks it through /get_server_info at start) and
# --chunked-prefill-size -1 (recommended: with
# SGLang's default chunking, 8192 tokens on an H200, the client must re-ask for the hidden states of all
# but the last chunk, 1.85x the prefill of a 9.7k-token rollout; docs/ENGINES.md). --deterministic adds
# --enable-deterministic-inference (needed for sampling_seed to be honoured: reproducible rollouts). Both serve token ids only
# (--skip-tokenizer-init): the trainer never sends text. Point the trainer's config at
# http://HOST:PORT for each role (several URLs per role for data-parallel servers on many nodes, or
# one sglang_router URL).
set -euo pipefail

role=${1:-}; shift || true
case "$role" in
  student) PORT=${PORT:-30000}; MEM=${MEM:-}; GPUS=${GPUS:-0}; SAVER=0 ;;
  teacher) PORT=${PORT:-30001}; MEM=${MEM:-0.80}; GPUS=${GPUS:-1}; SAVER=0 ;;
  *) sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 2 ;;
esac
MODEL=${MODEL:-}; HOST=${HOST:-127.0.0.1}; TP=${TP:-1}; DP=${DP:-1}; API_KEY=${API_KEY:-}
DRY=0; DET=0; EXTRA=(); SCORING=${SCORING:-local}
while (($#)); do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    --dp) DP=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --api-key) API_KEY=$2; shift 2 ;;
    --memory-saver) SAVER=1; shift ;;
    --no-memory-saver) SAVER=0; shift ;;
    --deterministic) DET=1; shift ;;
    --scoring) SCORING=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch_sglang.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -n "$MODEL" ]] || { echo "launch_sglang.sh: --model is required" >&2; exit 2; }
[[ "$SCORING" == local || "$SCORING" == server ]] || { echo "launch_sglang.sh: --scoring must be local or server, got $SCORING" >&2; exit 2; }

cmd=("${SGLANG_PYTHON:-python}" -m sglang.launch_server --model-path "$MODEL" --host "$HOST" --port "$PORT"
     --tp-size "$TP" --dp-size "$DP" --skip-tokenizer-init)
[[ -n "$MEM" ]] && cmd+=(--mem-fraction-static "$MEM")
((SAVER)) && cmd+=(--enable-memory-saver)
# hidden states only for teacher.scoring: server (with local no request asks for them: tests/test_pipeline.py)
[[ "$role" == teacher && "$SCORING" == server ]] && cmd+=(--enable-return-hidden-states --chunked-prefill-size -1)
((DET)) && cmd+=(--enable-deterministic-inference)
[[ -n "$API_KEY" ]] && cmd+=(--api-key "$API_KEY")
cmd+=("${EXTRA[@]}")

if ((DRY)); then
  echo "CUDA_VISIBLE_DEVICES=$GPUS ${cmd[*]}"
else
  echo "launch_sglang.sh: $role on http://$HOST:$PORT (GPUs $GPUS, tp $TP, dp $DP, mem ${MEM:-sglang default})" >&2
  CUDA_VISIBLE_DEVICES=$GPUS exec "${cmd[@]}"
fi
