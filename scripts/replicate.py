"""Paper Tables 1-2 on a built-in task: warm start, OPD, low-OT DW, matched high-OT DW, TOPD, and a
supervised ground-truth control, at equal steps and rollouts, over several seeds (issues 7 and 18).

    .venv/bin/python scripts/replicate.py                       # the deque long-trace testbed, 5 seeds x all rows
    .venv/bin/python scripts/replicate.py --seeds 0 --rows topd --tag lam1 -- topd.lam=0.1   # a sweep point
    .venv/bin/python scripts/replicate.py --configs configs/demo --warm-start runs/arith-kd/final \
        --out runs/replicate --steps 150 --lr 1e-3 --eval-samples 1000 --seeds 0 1 2      # arith (docs/RESULTS.md)

Every row starts from the same warm-start student (`--warm-start`, default the committed models/deque/student;
a missing `runs/NAME/final` is trained first with CONFIGS/stage1_kd.yaml as run NAME, after `topd-ds sample`)
and runs `topd-ds train` with CONFIGS/topd.yaml (default configs/deque-long) and `topd.mode=<row>`, so K, the
candidate fraction, lr, batch and rollouts are the same for every row. The ground-truth rows train the same
student with CE on the data's own reference traces (`train.stage=kd kd.source=dataset kd.kd_ratio=0`):
`gt_steps` for as many steps (32 sequences each) as the distillation rows, `gt_time` for as many steps as fit
in the mean wall time of the OPD runs. Pass@1 is greedy on the first `--eval-samples` held-out problems, before
and after, unless the overrides ask for the paper's sampled Pass@1 (`-- train.eval_n=4 train.eval_temperature=1.0`:
the mean over 4 samples per problem). Each finished run is appended at once as one JSON line to OUT/runs.jsonl
(name, row, seed, before, after, steps, training seconds); a run already there (or whose summary.json exists)
is not rerun, so an interrupted study continues where it stopped. Prints a markdown table and writes
results.json. docs/FIDELITY.md has the deque testbed's table and commands.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILL_ROWS = ("opd", "opd_dw_low_ot", "opd_dw_high_ot", "topd")
ALL_ROWS = DISTILL_ROWS + ("gt_steps", "gt_time")


def train(args, *overrides):
    cmd = [sys.executable, "-m", "topd_ds.cli", "train", "--resume", "none", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stdout, stderr=subprocess.STDOUT)


def summary_path(args, name):
    return os.path.join(REPO, args.out, name, "summary.json")


def read_summary(args, name):
    with open(summary_path(args, name)) as f:
        s = json.load(f)
    ev = {int(k): v for k, v in s["eval"].items()}
    wall = sum(h.get("time/step_s", 0.0) for h in s["history"])
    return {"before": ev[min(ev)], "after": ev[max(ev)], "steps": s["steps"], "train_wall_s": wall}


def runs_file(args):
    return os.path.join(REPO, args.out, "runs.jsonl")


def finished_runs(args) -> dict:
    """{run name: record} from OUT/runs.jsonl; a torn last line (killed mid-write) is ignored."""
    out = {}
    if os.path.exists(runs_file(args)):
        with open(runs_file(args)) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out[rec["name"]] = rec
    return out


def append_run(args, record: dict):
    """One line per finished run, flushed and fsynced before the next run starts."""
    os.makedirs(os.path.dirname(runs_file(args)), exist_ok=True)
    with open(runs_file(args), "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:  # a line torn by a kill has no newline: end it, keep the record whole
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def run_row(args, row, seed, steps=None):
    name = f"{args.tag + '-' if args.tag else ''}{row}-s{seed}"
    done = finished_runs(args)
    if name in done:
        print(f"{name}: done already ({runs_file(args)})", flush=True)
        return done[name]
    if os.path.exists(summary_path(args, name)):  # finished before runs.jsonl existed
        print(f"{name}: done already", flush=True)
        result = dict(read_summary(args, name), name=name, row=row, seed=seed)
        append_run(args, result)
        return result
    common = [f"model.student={args.warm_start}", f"train.seed={seed}", f"train.run_name={name}",
              f"train.out_dir={args.out}", f"train.eval_samples={args.eval_samples}", "train.save_every=0",
              f"train.lr={args.lr}"]
    if row in DISTILL_ROWS:
        train(args, "--config", os.path.join(args.configs, "topd.yaml"), f"topd.mode={row}",
              f"train.steps={args.steps}", *common, *args.overrides)
    else:
        train(args, "--config", os.path.join(args.configs, "stage1_kd.yaml"), "kd.source=dataset", "kd.kd_ratio=0",
              "kd.n_samples=0", f"train.steps={steps or args.steps}", *common, *args.overrides)
    result = dict(read_summary(args, name), name=name, row=row, seed=seed)
    append_run(args, result)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=ALL_ROWS)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per distillation run")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--warm-start", default="models/deque/student")
    ap.add_argument("--configs", default="configs/deque-long", help="folder with the task's topd.yaml and stage1_kd.yaml")
    ap.add_argument("--out", default="runs/replicate-deque-long")
    ap.add_argument("--tag", default="", help="prefix of the run names (sweeps)")
    ap.add_argument("overrides", nargs="*", help="extra key.path=value overrides for every run")
    args = ap.parse_args()
    t0 = time.time()
    if not os.path.isdir(os.path.join(REPO, args.warm_start)):
        print(f"{args.warm_start} missing: training the stage-1 student", flush=True)
        run_dir = os.path.dirname(os.path.normpath(args.warm_start))  # runs/NAME/final -> run NAME under runs/
        where = [f"train.out_dir={os.path.dirname(run_dir) or '.'}", f"train.run_name={os.path.basename(run_dir)}"]
        kd = os.path.join(args.configs, "stage1_kd.yaml")
        sample = [sys.executable, "-m", "topd_ds.cli", "sample", "--config", kd, *where]
        subprocess.run(sample, check=True, cwd=REPO)  # the teacher's responses first (resumable)
        train(args, "--config", kd, *where)

    results = {}
    for seed in args.seeds:  # seed-major: a partial study already has every row for the first seeds
        for row in args.rows:
            steps = None
            if row == "gt_time":
                opd = [r for (rw, _), r in results.items() if rw == "opd"] or \
                      [read_summary(args, f"{args.tag + '-' if args.tag else ''}opd-s{seed}")]
                gt = results.get(("gt_steps", seed)) or run_row(args, "gt_steps", seed)
                per_step = gt["train_wall_s"] / gt["steps"]
                steps = max(1, round(statistics.mean(r["train_wall_s"] for r in opd) / per_step))
            results[(row, seed)] = run_row(args, row, seed, steps)

    table = {}
    for row in args.rows:
        runs = [results[(row, s)] for s in args.seeds]
        after = [100 * r["after"] for r in runs]
        table[row] = {"seeds": args.seeds, "before": [100 * r["before"] for r in runs], "after": after,
                      "mean": statistics.mean(after), "std": statistics.stdev(after) if len(after) > 1 else 0.0,
                      "steps": [r["steps"] for r in runs], "train_wall_s": [r["train_wall_s"] for r in runs]}
    out = os.path.join(REPO, args.out, f"results{'-' + args.tag if args.tag else ''}.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": vars(args), "rows": table, "wall_s": time.time() - t0}, f, indent=1)
    os.replace(tmp, out)

    print(f"\n| row | pass@1 % after, mean +- std over seeds {args.seeds} | per seed | steps | train s |")
    print("|---|---|---|---|---|")
    before = [b for row in table.values() for b in row["before"]]
    print(f"| warm start | {statistics.mean(before):.1f} | {' / '.join(f'{b:.1f}' for b in before[:len(args.seeds)])} | 0 | 0 |")
    for row, t in table.items():
        print(f"| {row} | {t['mean']:.1f} +- {t['std']:.1f} | {' / '.join(f'{a:.1f}' for a in t['after'])} | "
              f"{'/'.join(map(str, sorted(set(t['steps']))))} | {statistics.mean(t['train_wall_s']):.0f} |")
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
