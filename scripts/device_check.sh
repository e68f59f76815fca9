#!/usr/bin/env bash
# One prepared check for a GPU machine (issue 9 item 4): CUDA OT numerics, bench_ot, bench_step; < 8 minutes.
#
#   OUT=/some/dir bash scripts/device_check.sh          # from the repository root; OUT defaults to out/device_check
#
# Steps (each under its own `timeout`, a failure is recorded and the next step still runs):
#   0. environment: python3 (the image's torch), TORCH_CUDA_ARCH_LIST=9.0 (H100/H200); if deepspeed (or another
#      requirement) is missing, installs the wheels carried in $WHEELS (default wheels/) into /tmp/site
#      (--no-index --no-deps: nothing can be fetched there) and puts it on PYTHONPATH with the repo root.
#   1. ot_cuda      Triton kernel vs torch path (CUDA) vs scipy exact, float32 and float64, with masks, at
#                   K = 16, 50, 128 (the kernel's limit); asserts the tolerances of tests/test_ot_triton.py.
#   2. pytest       tests/test_ot.py tests/test_ot_triton.py (CPU numerics on that machine's torch).
#   3. bench_ot     scripts/bench_ot.py (B=218, K=50, D=2560: the paper's candidates per batch and window).
#   4. bench_zero   scripts/bench_zero.py if it exists (the ZeRO-3 step benchmark of issue 9 item 2).
#   5. bench_step   scripts/bench_step.py with built-in servers and trainer on cuda (8 steps, 2 warm-up).
# Every timeout is cut to what is left of BUDGET_S (450 s). Writes $OUT/summary.json (card, versions, each
# step's rc and seconds, the results of steps 1, 3, 4, 5) and $OUT/log.txt.
# Not run yet: no session so far had a GPU machine (docs/BENCHMARKS.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device_check}
WHEELS=${WHEELS:-wheels}
PY=${PY:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/log.txt"
: > "$LOG"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
T_START=$(date +%s)

BUDGET_S=${BUDGET_S:-450}  # every step's timeout is cut to what is left of this, so the whole stays < 8 minutes

step() {  # step NAME TIMEOUT_S CMD...: run, log, record "name rc seconds"
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    local left=$(( T_START + BUDGET_S - t0 ))
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped, time budget spent" | tee -a "$LOG"
        printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    echo "=== $name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

# -- 0. environment ----------------------------------------------------------------------------------------
need_wheels=0
for mod in deepspeed transformers scipy yaml tensorboard tqdm aiohttp safetensors; do
    $PY -c "import $mod" 2>/dev/null || { echo "missing python module: $mod" | tee -a "$LOG"; need_wheels=1; }
done
if [ "$need_wheels" = 1 ]; then
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH="$PWD:/tmp/site"
    fi
    # deepspeed ships as an sdist: build it without ops (topd-ds's ZeRO paths need none compiled ahead)
    if ! $PY -c "import deepspeed" 2>/dev/null && compgen -G "$WHEELS/deepspeed-*.tar.gz" > /dev/null; then
        DS_BUILD_OPS=0 step deepspeed_sdist 180 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
            --target /tmp/site "$WHEELS"/deepspeed-*.tar.gz
        export PYTHONPATH="$PWD:/tmp/site"
    fi
    $PY -c "import deepspeed" 2>/dev/null || echo "deepspeed still missing: bench_step will fail" | tee -a "$LOG"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>>"$LOG" || true
$PY - "$OUT/versions.json" >> "$LOG" 2>&1 <<'EOF'
import importlib, json, sys  # written to the file: deepspeed's import logs to stdout
out = {}
for m in ("torch", "triton", "deepspeed", "transformers", "scipy"):
    try:
        out[m] = importlib.import_module(m).__version__
    except Exception as err:
        out[m] = f"missing: {type(err).__name__}"
import torch
out["cuda"] = torch.version.cuda
out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
json.dump(out, open(sys.argv[1], "w"))
EOF
cat "$OUT/versions.json"; echo

# -- 1. Triton vs torch vs exact on CUDA --------------------------------------------------------------------
cat > "$OUT/ot_cuda.py" <<'EOF'
import json, sys, time
import torch
from topd_ds.ot import exact_ot, sinkhorn, token_cost

# argv: out.json [device [sizes]]; a CPU dry run: TRITON_INTERPRET=1 python ot_cuda.py o.json cpu 8
dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
sizes = [int(k) for k in sys.argv[3].split(",")] if len(sys.argv) > 3 else [16, 50, 128]
assert dev == "cpu" or torch.cuda.is_available(), "no CUDA device"
sync = torch.cuda.synchronize if dev != "cpu" else (lambda: None)
rows = []
g = torch.Generator().manual_seed(0)
for K in sizes:
    B, D = (64, 256) if dev != "cpu" else (6, 16)
    emb = torch.randn(500, D, generator=g)
    cost = token_cost(emb, torch.randint(0, 500, (B, K), generator=g), torch.randint(0, 500, (B, K), generator=g))
    mask_a = torch.ones(B, K, dtype=torch.bool); mask_a[1::3, K // 2:] = False     # early-stopped windows
    mask_b = torch.ones(B, K, dtype=torch.bool); mask_b[2::3, 2 * K // 3:] = False
    _, d_ex = exact_ot(cost.double(), mask_a=mask_a, mask_b=mask_b)
    for dt in (torch.float64, torch.float32):
        c = cost.to(dt).to(dev)
        kw = dict(mask_a=mask_a.to(dev), mask_b=mask_b.to(dev), eps=1e-2, eps_scaling=0.2)
        p_t, i_t = sinkhorn(c, backend="triton", fixed_iter=600, **kw)
        p_r, i_r = sinkhorn(c, backend="torch", fixed_iter=600, **kw)
        sync()
        t0 = time.perf_counter(); sinkhorn(c, backend="triton", fixed_iter=600, **kw); sync()
        ms_triton = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter(); sinkhorn(c, backend="torch", fixed_iter=600, **kw); sync()
        ms_torch = 1e3 * (time.perf_counter() - t0)
        assert i_t.backend == "triton", i_t.backend
        plan_diff = float((p_t - p_r).abs().max())
        dist_diff = float((i_t.distance - i_r.distance).abs().max())
        rel_exact = float(((i_t.distance.double().cpu() - d_ex) / d_ex).abs().max())
        masked = float(torch.cat([p_t[~kw["mask_a"]].flatten(), p_t.transpose(1, 2)[~kw["mask_b"]].flatten()]).abs().max())
        rows.append(dict(K=K, B=B, dtype=str(dt)[6:], plan_max_diff_vs_torch=plan_diff,
                         dist_max_diff_vs_torch=dist_diff, rel_err_vs_exact=rel_exact, masked_mass=masked,
                         ms_triton=ms_triton, ms_torch=ms_torch))
        print(rows[-1], flush=True)
        tol = 1e-8 if dt == torch.float64 else 1e-5
        assert plan_diff < tol and dist_diff < tol * 10, (K, dt, plan_diff, dist_diff)
        assert masked == 0.0, (K, dt, masked)
        assert rel_exact < 2e-2, (K, dt, rel_exact)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("OK")
EOF
step ot_cuda 90 $PY "$OUT/ot_cuda.py" "$OUT/ot_cuda.json"

# -- 2. the OT tests on that machine -----------------------------------------------------------------------
step pytest_ot 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_ot.py tests/test_ot_triton.py

# -- 3. bench_ot at the paper's sizes -----------------------------------------------------------------------
step bench_ot 90 $PY scripts/bench_ot.py --repeat 3 --json "$OUT/bench_ot.json"

# -- 4. ZeRO-3 step benchmark (issue 9 item 2), when someone has written it -----------------------------------
if [ -f scripts/bench_zero.py ]; then
    step bench_zero 120 $PY scripts/bench_zero.py --json "$OUT/bench_zero.json"
else
    echo "scripts/bench_zero.py absent: ZeRO-3 step benchmark skipped" | tee -a "$LOG"
    printf 'bench_zero\tabsent\t0\n' >> "$STEPS"
fi

# -- 5. bench_step with the servers and the trainer on the GPU --------------------------------------------
step bench_step 200 $PY scripts/bench_step.py --steps 8 --warmup 2 --device cuda --out-dir runs/bench-step-cuda \
    --json "$OUT/bench_step.json" --md "$OUT/bench_step.md"

# -- summary ------------------------------------------------------------------------------------------------
$PY - "$OUT" "$T_START" <<'EOF'
import json, os, sys, time
out, t_start = sys.argv[1], int(sys.argv[2])
def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as err:
        return f"missing ({type(err).__name__})"
steps = [dict(zip(("name", "rc", "seconds"), line.rstrip("\n").split("\t"))) for line in open(os.path.join(out, "steps.tsv"))]
gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None
summary = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=gpu, versions=load("versions.json"),
               total_s=int(time.time()) - t_start, steps=steps, ot_cuda=load("ot_cuda.json"),
               bench_ot=load("bench_ot.json"), bench_zero=load("bench_zero.json"), bench_step=load("bench_step.json"))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("date", "gpu", "total_s", "steps")}, indent=1))
EOF
