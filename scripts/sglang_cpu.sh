#!/usr/bin/env bash
# Real SGLang 0.5.23 on this CPU-only machine, as a conformance harness for our client and server
# (not a way to serve: SGLang has no CPU wheel; docs/ENGINES.md explains the recipe).
#
#   scripts/sglang_cpu.sh setup            build .venv-sglang (CPU torch 2.13 pinned, sglang --no-deps,
#                                          light deps, sgl_kernel loader stub, torchvision meta patch)
#   scripts/sglang_cpu.sh serve MODEL PORT [FLAGS..]  start sglang.launch_server on MODEL (foreground)
#   scripts/sglang_cpu.sh test             setup, tiny Qwen3 model, start two SGLang servers on it (CPU
#                                          defaults, and --chunked-prefill-size 16 for the long-sequence
#                                          checks), run tests/test_engines_conformance.py; then the
#                                          production topology rehearsed (tests/test_rehearsal.py, with
#                                          .venv's python: a student and a chunked-prefill teacher SGLang
#                                          server on models/deque, the 2-rank trainer killed and resumed)
#
# `make test-sglang` runs `test`. Environment: SGLANG_VENV (default .venv-sglang), SGLANG_PORT (30111;
# the chunked server listens on SGLANG_PORT + 1, the rehearsal's student and teacher on + 2 and + 3),
# TRAIN_VENV (default .venv: the trainer's, with DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SGLANG_VENV:-$ROOT/.venv-sglang}
PORT=${SGLANG_PORT:-30111}
STUB=$VENV/sgl_kernel_stub          # holds an empty common_ops.py, first on PYTHONPATH
LIGHT_DEPS=(aiohttp "anthropic>=0.20.0" blobfile==3.0.0 build compressed-tensors==0.18.0 datasets dill distro
  easydict einops fastapi gguf interegular IPython "llguidance>=1.7.6,<2" "mistral_common>=1.11.5" modelscope
  msgspec ninja numpy openai==2.8.0 openai-harmony==0.0.4 orjson outlines==0.1.11 packaging partial_json_parser
  pillow "prometheus-client>=0.20.0" psutil pybase64 pydantic "python-dateutil<3" python-multipart
  "pyzmq>=25.1.2" regex requests scipy sentencepiece==0.2.1 setproctitle soundfile tiktoken tokenizers==0.23.2
  tqdm transformers==5.19.0 "uvicorn>=0.51" uvloop watchfiles xgrammar==0.2.7 xxhash zstandard triton pytest
  hypothesis)

setup() {
  # done once per version of this script (the stamp is newer than the script): a rerun skips ~1-4 min of pip
  if [[ -f "$VENV/.topd-setup-done" && "$VENV/.topd-setup-done" -nt "$ROOT/scripts/sglang_cpu.sh" ]]; then
    echo "$VENV: set up already"; return 0
  fi
  test -x "$VENV/bin/python" || python3 -m venv "$VENV"
  local pip=("$VENV/bin/pip" install -q)
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  "${pip[@]}" -c "$VENV/constraints.txt" torch==2.13.0
  # sglang and its CUDA-only kernel package without dependencies: they would replace the CPU torch.
  "${pip[@]}" --no-deps sglang==0.5.23 sglang-kernel==0.4.10 torchvision==0.28.0 timm==1.0.25
  "${pip[@]}" -c "$VENV/constraints.txt" "${LIGHT_DEPS[@]}"
  "${pip[@]}" --no-deps -e .
  # sgl_kernel's loader imports common_ops; an empty module first on the path means "no compiled ops".
  mkdir -p "$STUB" && : > "$STUB/common_ops.py"
  # PyPI's torchvision is a CUDA build: its fake nms/qnms registrations fail beside CPU torch. Skip them.
  "$VENV/bin/python" - <<'PY'
import pathlib, sysconfig
p = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
s = p.read_text()
if "TOPD_PATCHED" not in s:
    s = s.replace("def register_meta(op_name, overload_name=\"default\"):\n    def wrapper(fn):\n",
                  "def register_meta(op_name, overload_name=\"default\"):  # TOPD_PATCHED\n    def wrapper(fn):\n"
                  "        if not hasattr(torch.ops.torchvision, op_name):\n            return fn\n", 1)
    s = s.replace("@torch.library.register_fake(\"torchvision::nms\")", "@_maybe_fake(\"torchvision::nms\")")
    s = s.replace("@torch.library.register_fake(\"torchvision::qnms\")", "@_maybe_fake(\"torchvision::qnms\")")
    s += ("\n" if "_maybe_fake" not in s else "")
    if "_maybe_fake(" in s and "def _maybe_fake" not in s:
        head = ("def _maybe_fake(name):  # TOPD_PATCHED: skip fakes of ops this build did not register\n"
                "    ns, op = name.split('::')\n"
                "    if hasattr(getattr(torch.ops, ns), op):\n"
                "        return torch.library.register_fake(name)\n"
                "    return lambda fn: fn\n\n\n")
        idx = s.index("\n\n\n") + 3
        s = s[:idx] + head + s[idx:]
    p.write_text(s)
PY
  SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$STUB" "$VENV/bin/python" -c "import sglang.srt.entrypoints.http_server" \
    && echo "sglang imports" && touch "$VENV/.topd-setup-done"
}

serve() {  # MODEL PORT [extra sglang flags]
  local model=$1 port=$2
  shift 2
  SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$STUB" exec "$VENV/bin/python" -m sglang.launch_server \
    --model-path "$model" --device cpu --attention-backend torch_native --sampling-backend pytorch \
    --host 127.0.0.1 --port "$port" --dtype float32 --max-total-tokens 4096 \
    --disable-decode-cuda-graph --disable-prefill-cuda-graph --enable-return-hidden-states "$@"
}

wait_up() {  # PID PORT LOG
  local t1=$SECONDS
  until curl -sf "http://127.0.0.1:$2/health" > /dev/null; do
    if ! kill -0 "$1" 2>/dev/null; then tail -50 "$3"; echo "SGLang on port $2 exited"; exit 1; fi
    if (( SECONDS - t1 > 600 )); then tail -50 "$3"; echo "SGLang on port $2 not healthy in 600 s"; exit 1; fi
    sleep 2
  done
  echo "SGLang on port $2 healthy after $((SECONDS - t1)) s (log: $3)"
}

run_test() {
  local t0=$SECONDS work model
  setup
  echo "setup took $((SECONDS - t0)) s"
  work=$(mktemp -d)
  model=$("$VENV/bin/python" - "$work" <<'PY'
import sys
from topd_ds.tasks.models import build_model, save_model
from topd_ds.tasks.chartok import build_char_tokenizer
tok = build_char_tokenizer()
m = build_model("qwen3", seed=1, vocab_size=len(tok), hidden=64, layers=2, heads=4, max_positions=256,
                pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
print(save_model(m, sys.argv[1] + "/teacher", tok))
PY
)
  # the second server chunks prefill into 16-token pieces (radix cache on): the long-sequence checks send
  # 40-100-token sequences there, as SGLang's GPU default (8192) chunks the paper's ~9.7k-token rollouts
  # each server in its own process group (setsid): SGLang's scheduler and detokenizer children go with it
  setsid bash "$ROOT/scripts/sglang_cpu.sh" serve "$model" "$PORT" > "$work/sglang.log" 2>&1 &
  SGLANG_PID=$!
  setsid bash "$ROOT/scripts/sglang_cpu.sh" serve "$model" "$((PORT + 1))" --chunked-prefill-size 16 > "$work/sglang-chunked.log" 2>&1 &
  CHUNKED_PID=$!
  # the rehearsal's student and teacher (tests/test_rehearsal.py), started now so that their start overlaps;
  # --sleep-on-idle: an idle SGLang scheduler otherwise polls at ~25% of a core, taken from the conformance run
  setsid bash "$ROOT/scripts/sglang_cpu.sh" serve "$ROOT/models/deque/student" "$((PORT + 2))" --sleep-on-idle \
    > "$work/rehearsal-student.log" 2>&1 &
  STUDENT_PID=$!
  setsid bash "$ROOT/scripts/sglang_cpu.sh" serve "$ROOT/models/deque/teacher" "$((PORT + 3))" --sleep-on-idle \
    --chunked-prefill-size 16 > "$work/rehearsal-teacher.log" 2>&1 &
  TEACHER_PID=$!
  trap 'kill -CONT -- -$TEACHER_PID 2>/dev/null; kill -- -$SGLANG_PID -$CHUNKED_PID -$STUDENT_PID -$TEACHER_PID 2>/dev/null;
        sleep 2; kill -9 -- -$SGLANG_PID -$CHUNKED_PID -$STUDENT_PID -$TEACHER_PID 2>/dev/null;
        wait $SGLANG_PID $CHUNKED_PID $STUDENT_PID $TEACHER_PID 2>/dev/null || true' EXIT
  wait_up $SGLANG_PID "$PORT" "$work/sglang.log"
  wait_up $CHUNKED_PID "$((PORT + 1))" "$work/sglang-chunked.log"
  wait_up $STUDENT_PID "$((PORT + 2))" "$work/rehearsal-student.log"
  wait_up $TEACHER_PID "$((PORT + 3))" "$work/rehearsal-teacher.log"
  TOPD_CONFORMANCE_URL="http://127.0.0.1:$PORT" TOPD_CONFORMANCE_MODEL="$model" \
    TOPD_CONFORMANCE_CHUNKED_URL="http://127.0.0.1:$((PORT + 1))" \
    "$VENV/bin/python" -m pytest -v -p no:cacheprovider tests/test_engines_conformance.py || status=$?
  # the conformance servers are done: stop them, so that their idle polling leaves the 2 cores to the rehearsal
  kill -- -$SGLANG_PID -$CHUNKED_PID 2>/dev/null || true
  # the production topology, rehearsed: the trainer (DeepSpeed, from .venv) against the two servers above
  local t1=$SECONDS train_venv=${TRAIN_VENV:-$ROOT/.venv}
  test -x "$train_venv/bin/python" || { echo "$train_venv/bin/python missing: run make setup (TRAIN_VENV)"; exit 1; }
  TOPD_REHEARSAL_STUDENT_URL="http://127.0.0.1:$((PORT + 2))" TOPD_REHEARSAL_TEACHER_URL="http://127.0.0.1:$((PORT + 3))" \
    TOPD_REHEARSAL_TEACHER_PGID=$TEACHER_PID \
    "$train_venv/bin/python" -m pytest -v -s -p no:cacheprovider tests/test_rehearsal.py || status=$?
  echo "rehearsal took $((SECONDS - t1)) s"
  echo "test-sglang total $((SECONDS - t0)) s"
  return ${status:-0}
}

case "${1:-}" in
  setup) setup ;;
  serve) shift; serve "$@" ;;
  test) run_test ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
