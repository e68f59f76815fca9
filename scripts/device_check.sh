#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issue 19): preflight, OT on CUDA, benchmarks, goals; < 7 minutes.
#
#   bash scripts/make_device_wheels.sh                  # here, first: wheels/ (DeepSpeed and what the image lacks)
#   OUT=out/device_check bash scripts/device_check.sh   # there, from the repository root (carry wheels/)
#   bash scripts/device_check.sh --dry-run              # anywhere: print the plan and budget, check every file it
#                                                       # names exists, run bench_zero at a tiny shape on the CPU
#
# Steps, in this order (the goals first), each under its own `timeout`, cut to what is left of BUDGET_S (420 s
# in all, 15 s kept back for the summary); a failed step is recorded and the next one still runs:
#   wheels      if a module below is missing: install $WHEELS/*.whl (no index, no deps) into /tmp/site
#   preflight   imports torch, triton, pytest, deepspeed, transformers, scipy, yaml, safetensors, aiohttp,
#               tensorboard; torch sees a GPU. No GPU, torch or triton: stop here (nothing else can run). No
#               DeepSpeed: the ZeRO and training steps are skipped, the OT steps still run.
#   ot_fp32     Triton kernel vs the torch path on CUDA vs scipy exact, float32, masks, K = 16, 50, 128
#   bench_ot    scripts/bench_ot.py: B=218, K=50, D=2560, fused kernel vs scipy exact (goal rows)
#   bench_zero  scripts/bench_zero.py: Qwen3-4B shape, sequence 4096, plain torch vs ZeRO-3 vs ZeRO-2
#   bench_step  scripts/bench_step.py: OPD and TOPD pipelined, built-in servers and trainer on the GPU
#   pytest      tests/test_ot_device.py (the table on cuda), tests/test_ot_triton.py (sm_90 build, interpreter),
#               the NCCL and CUDA IPC weight routes to a built-in server on cuda (tests/test_weight_routes.py)
#   ot_fp64     as ot_fp32 in float64
# Writes $OUT/summary.json: the card, versions, each step's rc and seconds, the results, and GOALS, each
# "pass", "fail" or "not run" with its measured value. $OUT/log.txt holds every step's output. Exit status 0
# only if every step that ran passed (a goal missed is not a failed step: read the goals).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ $# -gt 0 ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
OUT=${OUT:-out/device_check}
WHEELS=${WHEELS:-wheels}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-420}  # 7 minutes for everything, wheels included
RESERVE_S=15               # kept back for the summary
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY" = 0 ] && export DS_ACCELERATOR=cuda  # the wheel was built on a CPU machine; pick CUDA at run time
LOG="$OUT/log.txt"
STEPS="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS"
T_START=$(date +%s)
PLANNED_S=0
MISSING=0

# Writes the OT check into $OUT (argv: out.json device dtype [sizes]; on the CPU it needs TRITON_INTERPRET=1).
write_ot_check() {
cat > "$OUT/ot_cuda.py" <<'EOF'
import json, sys, time
import torch
from topd_ds.ot import exact_ot, sinkhorn, token_cost

out, dev, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
sizes = [int(k) for k in sys.argv[4].split(",")] if len(sys.argv) > 4 else [16, 50, 128]
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
    c = cost.to(dtype).to(dev)
    kw = dict(mask_a=mask_a.to(dev), mask_b=mask_b.to(dev), eps=1e-2, eps_scaling=0.2, fixed_iter=600)
    p_t, i_t = sinkhorn(c, backend="triton", **kw)
    p_r, i_r = sinkhorn(c, backend="torch", **kw)
    sync()
    t0 = time.perf_counter(); sinkhorn(c, backend="triton", **kw); sync()
    ms_triton = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter(); sinkhorn(c, backend="torch", **kw); sync()
    ms_torch = 1e3 * (time.perf_counter() - t0)
    assert i_t.backend == "triton", i_t.backend
    plan_diff = float((p_t - p_r).abs().max())
    dist_diff = float((i_t.distance - i_r.distance).abs().max())
    rel_exact = float(((i_t.distance.double().cpu() - d_ex) / d_ex).abs().max())
    masked = float(torch.cat([p_t[~kw["mask_a"]].flatten(), p_t.transpose(1, 2)[~kw["mask_b"]].flatten()]).abs().max())
    rows.append(dict(K=K, B=B, dtype=sys.argv[3], plan_max_diff_vs_torch=plan_diff, dist_max_diff_vs_torch=dist_diff,
                     rel_err_vs_exact=rel_exact, masked_mass=masked, ms_triton=ms_triton, ms_torch=ms_torch))
    print(rows[-1], flush=True)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    assert plan_diff < tol and dist_diff < tol * 10, (K, dtype, plan_diff, dist_diff)
    assert masked == 0.0, (K, dtype, masked)
    assert rel_exact < 2e-2, (K, dtype, rel_exact)
json.dump(rows, open(out, "w"), indent=1)
print("OK")
EOF
}

# Writes the preflight into $OUT: imports and the GPU -> preflight.json; exit 0 only if the OT steps can run.
write_preflight() {
cat > "$OUT/preflight.py" <<'EOF'
import importlib, json, sys
mods = ["torch", "triton", "pytest", "deepspeed", "transformers", "scipy", "yaml", "safetensors", "aiohttp",
        "tensorboard", "numpy"]
out = {"modules": {}}
for m in mods:
    try:
        out["modules"][m] = getattr(importlib.import_module(m), "__version__", "present")
    except Exception as err:
        out["modules"][m] = f"missing: {type(err).__name__}: {err}"
ok = lambda m: not str(out["modules"][m]).startswith("missing")
gpu = None
if ok("torch"):
    import torch
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
        out["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
out["gpu"] = gpu
out["can_run_ot"] = bool(gpu) and ok("triton") and ok("scipy") and ok("pytest")
out["can_run_training"] = out["can_run_ot"] and all(ok(m) for m in ("deepspeed", "transformers", "yaml",
                                                                     "safetensors", "aiohttp", "tensorboard"))
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(0 if out["can_run_ot"] else 1)
EOF
}

# Writes the summary into $OUT: every result file, each step's rc, and the goals of issue 19.
write_summary() {
cat > "$OUT/summarise.py" <<'EOF'
import json, os, sys, time
out, t_start = sys.argv[1], int(sys.argv[2])

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as err:
        return f"missing ({type(err).__name__})"

def rows(bench, solver_prefix):
    return [r for r in bench.get("rows", []) if r["solver"].startswith(solver_prefix)] if isinstance(bench, dict) else []

bench_ot, bench_zero, bench_step = load("bench_ot.json"), load("bench_zero.json"), load("bench_step.json")
fused = rows(bench_ot, "triton sinkhorn float32")  # the whole sinkhorn() call, one row per cost family
exact = {r["costs"]: r["ms"] for r in rows(bench_ot, "scipy exact")}
ratio = lambda src, key: src.get("ratios", {}).get(key) if isinstance(src, dict) else None
GOALS = [  # name, what, comparison, target, measured value (None: not run)
    ("fused_sinkhorn_ms", "fused Sinkhorn, whole call, 218 problems of 50 x 50 (D=2560), float32, worst family",
     "<=", 0.2, max((r["ms"] for r in fused), default=None)),
    ("fused_vs_scipy_exact", "scipy exact ms / fused Sinkhorn ms on the same problems, worst family",
     ">=", 35.0, min((exact[r["costs"]] / r["ms"] for r in fused if r["costs"] in exact), default=None)),
    ("topd_opd_pipelined", "TOPD/OPD step time, pipelined (bench_step, built-in servers and trainer on the GPU)",
     "<=", 1.10, ratio(bench_step, "TOPD/OPD step time, pipelined")),
    ("zero2_vs_plain", "ZeRO-2 tokens/s over plain torch, Qwen3-4B shape, seq 4096, one GPU (recommended there)",
     ">=", 0.8, ratio(bench_zero, "zero2/plain tokens/s")),
    ("zero3_vs_plain", "ZeRO-3 (shipped zero3.json) tokens/s over plain torch, same step",
     ">=", 0.8, ratio(bench_zero, "zero3/plain tokens/s")),
]
on_gpu = lambda src: isinstance(src, dict) and src.get("meta", {}).get("device") == "cuda"
if not (on_gpu(bench_zero) and bench_zero["meta"].get("shape") == "4b"):  # e.g. the dry run's tiny CPU shape
    GOALS = [g if not g[0].startswith("zero") else g[:4] + (None,) for g in GOALS]
goals = {}
for name, what, op, target, value in GOALS:
    status = "not run" if value is None else ("pass" if (value <= target if op == "<=" else value >= target) else "fail")
    goals[name] = dict(what=what, goal=f"{op} {target}", value=value, status=status)
steps = []
if os.path.exists(os.path.join(out, "steps.tsv")):
    steps = [dict(zip(("name", "rc", "seconds"), ln.rstrip("\n").split("\t"))) for ln in open(os.path.join(out, "steps.tsv"))]
pre = load("preflight.json")
summary = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dry_run=os.environ.get("DRY") == "1",
               gpu=pre.get("gpu") if isinstance(pre, dict) else None, preflight=pre, total_s=int(time.time()) - t_start,
               steps=steps, goals=goals,
               kernel_row=rows(bench_ot, "triton kernel"), ot_fp32=load("ot_cuda_float32.json"),
               ot_fp64=load("ot_cuda_float64.json"), bench_ot=bench_ot, bench_zero=bench_zero, bench_step=bench_step)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("date", "gpu", "total_s", "steps", "goals")}, indent=1))
EOF
}

need() {  # dry run: every file a step names must exist
    for f in "$@"; do
        if [ ! -e "$f" ]; then echo "MISSING: $f" | tee -a "$LOG"; MISSING=1; fi
    done
}

step() {  # step NAME LIMIT_S CMD...: run under its own timeout, cut to the budget left; record "name rc seconds"
    local name=$1 limit=$2
    shift 2
    PLANNED_S=$(( PLANNED_S + limit ))
    if [ "$DRY" = 1 ]; then
        printf '  %-11s %4ss  %s\n' "$name" "$limit" "$*"
        return
    fi
    local t0 left rc
    t0=$(date +%s)
    left=$(( T_START + BUDGET_S - RESERVE_S - t0 ))
    if [ "$left" -lt 10 ]; then
        echo "=== $name: skipped, time budget spent" | tee -a "$LOG"
        printf '%s\tskipped: budget\t0\n' "$name" >> "$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    echo "=== $name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

skip() {  # skip NAME REASON
    echo "=== $1: skipped, $2" | tee -a "$LOG"
    printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$STEPS"
}

write_ot_check
write_preflight
write_summary
need scripts/bench_ot.py scripts/bench_zero.py scripts/bench_step.py scripts/make_device_wheels.sh \
    ds_configs/zero3.json ds_configs/zero2.json tests/test_ot_device.py tests/test_ot_triton.py tests/test_weight_routes.py \
    configs/demo/topd.yaml models/arith
[ "$DRY" = 1 ] && echo "plan (budget ${BUDGET_S}s in all, ${RESERVE_S}s kept for the summary; each timeout is cut to what is left):"

# -- wheels and preflight ---------------------------------------------------------------------------------------
if [ "$DRY" = 1 ] || ! timeout 30 $PY -c "import deepspeed, pytest, transformers, scipy" > /dev/null 2>&1; then
    if [ "$DRY" = 1 ] || compgen -G "$WHEELS/*.whl" > /dev/null; then
        step wheels 45 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH="$PWD:/tmp/site"
    else
        echo "no $WHEELS/*.whl to install (make them with scripts/make_device_wheels.sh)" | tee -a "$LOG"
    fi
fi
step preflight 40 $PY "$OUT/preflight.py" "$OUT/preflight.json"
can() { [ "$DRY" = 1 ] || timeout 10 $PY -c "import json, sys; sys.exit(0 if json.load(open('$OUT/preflight.json')).get('$1') else 1)" 2>/dev/null; }

if can can_run_ot; then
    step ot_fp32 60 $PY "$OUT/ot_cuda.py" "$OUT/ot_cuda_float32.json" cuda float32
    step bench_ot 75 $PY scripts/bench_ot.py --repeat 5 --json "$OUT/bench_ot.json"
    if can can_run_training; then
        step bench_zero 150 $PY scripts/bench_zero.py --shape 4b --seq 4096 --steps 2 --warmup 1 --device cuda \
            --variant-timeout 75 --json "$OUT/bench_zero.json"
        step bench_step 130 $PY scripts/bench_step.py --steps 6 --warmup 2 --only opd-pipe,topd-pipe --device cuda \
            --out-dir runs/bench-step-cuda --json "$OUT/bench_step.json" --md "$OUT/bench_step.md"
    else
        skip bench_zero "deepspeed or a training module missing (preflight.json)"
        skip bench_step "deepspeed or a training module missing (preflight.json)"
    fi
    step pytest 75 $PY -m pytest -q -x -p no:cacheprovider tests/test_ot_device.py tests/test_ot_triton.py \
        tests/test_weight_routes.py::test_gpu_routes_nccl_and_cuda_ipc
    step ot_fp64 45 $PY "$OUT/ot_cuda.py" "$OUT/ot_cuda_float64.json" cuda float64
else
    echo "preflight: no GPU, torch, triton, scipy or pytest (see $OUT/preflight.json): nothing else can run" | tee -a "$LOG"
fi

if [ "$DRY" = 1 ]; then
    echo "planned: ${PLANNED_S}s of step timeouts against a budget of ${BUDGET_S}s (later steps are cut or skipped)"
    # The one step that runs on a CPU: bench_zero at a tiny shape (three real engines: plain, ZeRO-3, ZeRO-2).
    echo "CPU check: bench_zero at a tiny shape"
    DS_ACCELERATOR=cpu timeout 240 $PY scripts/bench_zero.py --shape tiny --device cpu --seq 32 --steps 1 --warmup 0 \
        --variant-timeout 100 --json "$OUT/bench_zero.json" >> "$LOG" 2>&1
    rc=$?
    printf 'bench_zero_tiny_cpu\t%s\t%s\n' "$rc" "$(( $(date +%s) - T_START ))" >> "$STEPS"
    [ "$rc" = 0 ] || { echo "bench_zero tiny CPU run failed (rc $rc): see $LOG" >&2; MISSING=1; }
fi
DRY=$DRY timeout 30 $PY "$OUT/summarise.py" "$OUT" "$T_START"
# exit status: 0 only if every file was there and every step that ran passed (skipped steps are in the summary)
FAILED=$(awk -F'\t' '$2 != "0" && $2 !~ /^skipped/' "$STEPS" | wc -l)
[ "$MISSING" = 0 ] && [ "$FAILED" = 0 ]
