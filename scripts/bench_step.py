"""Per-step wall time of OPD vs TOPD (or any topd.mode rows), synchronous vs pipelined, at matched settings, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py [--config configs/demo/topd.yaml] [--steps 12 --warmup 2]
        [--window 16] [--fraction 0.1 | --paper-ratio] [--device cpu] [--json out.json] [--md out.md] [key.path=value ...]
        [--modes opd,opd_dw_low_ot,opd_dw_high_ot,topd --staleness 0]   (issue 25's rows, interleaved)

Four trainings with `topd-ds train` (each a subprocess that launches its own built-in servers), all from
--config (default configs/demo/topd.yaml, the arith models; configs/deque/topd.yaml for the deque task) with the
same seed, hence the same prompts and the same first rollouts: {opd, topd} x {pipeline.max_staleness=0 (synchronous), 1 (pipelined)}. Eval is off
(data.eval=null) and checkpoints only at the end, so the steps are timed alone. Each run's
runs/<out>/bench-<mode>-<sync|pipe>/summary.json holds per-step `time/*` scalars; the first --warmup steps
(server warm-up, first weight sync) are dropped and the rest averaged. --rounds R repeats the four runs
(every other round in reverse order) and pools their steps, so a load change on a shared machine hits all alike;
with more than one round each ratio is also given round by round. --modes and --staleness choose the rows (the
first mode is the reference of the ratios).

Columns: step_s is the trainer's wall time per step (what a user waits for); train_s, sync_s, wait_s are the
trainer's own stages (forward/backward/optimizer, weight write, waiting for the pipeline's batch);
rollout_s, scoring_s, probing_s, ot_s are the pipeline's stages for that batch (they overlap the trainer's
work when pipelined). TOPD/OPD is the ratio of mean step_s at the same max_staleness, measured in this run.

--paper-ratio uses the paper's m/N = 218/9688 ~ 2.25% of response tokens as candidates; arith responses are
~20 tokens, so it sets topd.candidate_count = max(1, round(0.0225 * mean response length)) instead (at least
one probe per sequence). Extra key.path=value arguments are passed to every training.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = "configs/demo/topd.yaml"
PAPER_FRACTION = 218 / 9688          # paper Sec 4: m/N, candidates per response token
ARITH_RESPONSE_TOKENS = 20           # typical arith response length (docs/ARITH.md), for --paper-ratio
STAGES = ("step_s", "train_s", "sync_s", "wait_s", "rollout_s", "scoring_s", "probing_s", "ot_s")
MODES = ("opd", "topd")
STALENESS = (0, 1)


def run_name(mode: str, staleness: int, rnd: int = 0) -> str:
    return f"bench-{mode}-{'pipe' if staleness else 'sync'}" + (f"-r{rnd}" if rnd else "")


def train(mode: str, staleness: int, rnd: int, *, steps: int, out_dir: str, candidate: list, device: str, extra: list,
          log_dir: str, config: str = BASE_CONFIG) -> str:
    """One `topd-ds train` subprocess; returns its run dir. Its output goes to log_dir/<name>.log."""
    name = run_name(mode, staleness, rnd)
    overrides = [f"topd.mode={mode}", f"pipeline.max_staleness={staleness}", f"train.steps={steps}",
                 "train.save_every=0", "data.eval=null", f"train.out_dir={out_dir}", f"train.run_name={name}",
                 f"student_server.device={device}", f"teacher_server.device={device}", *candidate, *extra]
    cmd = [sys.executable, "-m", "topd_ds.cli", "train", "--config", config, "--resume", "none", *overrides]
    log = os.path.join(log_dir, f"{name}.log")
    print(f"$ {' '.join(cmd[2:])}  > {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{name}: topd-ds train exited {rc}; log tail:\n{tail}")
    print(f"  {name}: {time.perf_counter() - t0:.1f}s wall (incl. server start and final checkpoint)", flush=True)
    return os.path.join(REPO, out_dir, name)


def summarise(run_dirs: list, warmup: int) -> dict:
    """Mean of each stage time and tokens/s over the steps after the warm-up, pooled over the rounds' runs."""
    history = []
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "summary.json")) as f:
            history += json.load(f)["history"][warmup:]
    if not history:
        raise SystemExit(f"{run_dirs}: no steps left after dropping {warmup} warm-up steps")
    out = {s: statistics.fmean(h.get(f"time/{s}", 0.0) for h in history) for s in STAGES}
    out["step_s_stdev"] = statistics.stdev(h["time/step_s"] for h in history) if len(history) > 1 else 0.0
    # tokens/s over the timed steps: sum of tokens / sum of step times (a mean of per-step rates would let
    # the short steps of a pipelined run, whose batch was already waiting, dominate)
    tokens = sum(h["train/tokens_per_s"] * h["time/step_s"] for h in history)
    out["tokens_per_s"] = tokens / sum(h["time/step_s"] for h in history)
    out["n_candidates"] = statistics.fmean(h.get("pipeline/n_candidates", 0.0) for h in history)
    out["response_len"] = statistics.fmean(h.get("pipeline/response_len", 0.0) for h in history)
    out["staleness"] = statistics.fmean(h.get("pipeline/staleness", 0.0) for h in history)
    out["steps_timed"] = len(history)
    return out


def step_s(run_dir: str, warmup: int) -> float:
    """Mean time/step_s of one run after the warm-up (for the per-round ratios)."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        return statistics.fmean(h["time/step_s"] for h in json.load(f)["history"][warmup:])


def markdown(results: dict, ratios: dict) -> str:
    head = ["run", *STAGES, "step_s sd", "tokens/s", "cands/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name] + [f"{r[s]:.3f}" for s in STAGES] + [f"{r['step_s_stdev']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['n_candidates']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, value in ratios.items():
        lines.append(f"* {key}: **{value:.3f}**" if isinstance(value, float) else f"* {key}: {value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=BASE_CONFIG, help="the TOPD config the four runs start from")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per training")
    ap.add_argument("--warmup", type=int, default=2, help="first steps dropped from the means")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of topd.mode values to time, first the reference of the ratios (issue 25's "
                         "rows: opd,opd_dw_low_ot,opd_dw_high_ot,topd)")
    ap.add_argument("--staleness", default=",".join(map(str, STALENESS)), help="comma list of max_staleness values")
    ap.add_argument("--window", type=int, default=16, help="K, probe window (demo 16; paper 50)")
    ap.add_argument("--fraction", type=float, default=0.1, help="topd.candidate_fraction (demo 0.1)")
    ap.add_argument("--paper-ratio", action="store_true",
                    help="m/N ~ 2.25%% as candidate_count = max(1, round(0.0225 * response tokens))")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the four runs, odd rounds in reverse order (a load drift hits all alike)")
    ap.add_argument("--device", default="cpu", help="built-in servers' device (cpu | cuda)")
    ap.add_argument("--out-dir", default="runs/bench-step", help="train.out_dir of the four runs")
    ap.add_argument("--only", default=None, help="comma list of runs to do, e.g. topd-pipe (profiling)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("overrides", nargs="*", help="key.path=value passed to every training")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    if args.paper_ratio:
        count = max(1, round(PAPER_FRACTION * ARITH_RESPONSE_TOKENS))
        candidate = [f"topd.candidate_count={count}"]
        setting = f"candidate_count={count} (paper m/N={100 * PAPER_FRACTION:.2f}%, at least 1)"
    else:
        candidate = [f"topd.candidate_fraction={args.fraction}", "topd.candidate_count=0"]
        setting = f"candidate_fraction={args.fraction}"
    candidate.append(f"topd.window={args.window}")
    log_dir = os.path.join(REPO, args.out_dir)
    os.makedirs(log_dir, exist_ok=True)
    modes, staleness = args.modes.split(","), [int(x) for x in args.staleness.split(",")]
    combos = [(m, s) for s in staleness for m in modes
              if args.only is None or f"{m}-{'pipe' if s else 'sync'}" in args.only.split(",")]

    t0 = time.time()
    run_dirs = {}
    for rnd in range(args.rounds):
        for mode, staleness in (combos if rnd % 2 == 0 else combos[::-1]):
            run_dir = train(mode, staleness, rnd, steps=args.steps, out_dir=args.out_dir, candidate=candidate,
                            device=args.device, extra=args.overrides, log_dir=log_dir, config=args.config)
            run_dirs.setdefault(run_name(mode, staleness)[len("bench-"):], []).append(run_dir)
    results = {name: summarise(dirs, args.warmup) for name, dirs in run_dirs.items()}
    ratios = {}
    reference = modes[0]
    for kind, label in (("sync", "synchronous"), ("pipe", "pipelined")):
        for mode in modes[1:]:
            if f"{reference}-{kind}" in results and f"{mode}-{kind}" in results:
                a, b = results[f"{mode}-{kind}"], results[f"{reference}-{kind}"]
                name = f"{mode.upper()}/{reference.upper()}"  # "TOPD/OPD step time, pipelined", as before
                ratios[f"{name} step time, {label}"] = a["step_s"] / b["step_s"]
                ratios[f"{name} train time, {label}"] = a["train_s"] / b["train_s"]
                if args.rounds > 1:  # the same ratio round by round: its spread says how far to trust the pooled one
                    per_round = [round(step_s(x, args.warmup) / step_s(y, args.warmup), 3) for x, y in
                                 zip(run_dirs[f"{mode}-{kind}"], run_dirs[f"{reference}-{kind}"])]
                    ratios[f"{name} step time, {label}, per round"] = per_round
    for mode in modes:
        if f"{mode}-sync" in results and f"{mode}-pipe" in results:
            ratios[f"{mode.upper()} pipelined/synchronous step time"] = \
                results[f"{mode}-pipe"]["step_s"] / results[f"{mode}-sync"]["step_s"]

    meta = {"config": args.config, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "wall_s": round(time.time() - t0, 1),
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "window": args.window, "candidates": setting,
            "device": args.device, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg": os.getloadavg(), "cpus": os.cpu_count(), "overrides": args.overrides}
    table = markdown(results, ratios)
    print(f"\n{json.dumps(meta)}\n\n{table}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
