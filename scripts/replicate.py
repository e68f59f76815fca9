"""Paper Tables 1-2 on a built-in task: warm start, OPD, low-OT DW, matched high-OT DW, TOPD, and a
supervised ground-truth control, at equal steps and rollouts, over several seeds (issues 7 and 18).

    .venv/bin/python scripts/replicate.py                       # the deque long-trace testbed, 5 seeds x all rows
    .venv/bin/python scripts/replicate.py --seeds 0 --rows topd --tag lam1 -- topd.lam=0.1   # a sweep point
    .venv/bin/python scripts/replicate.py --configs configs/demo --warm-start runs/arith-kd/final \
        --out runs/replicate --steps 150 --lr 1e-3 --eval-samples 1000 --seeds 0 1 2      # arith (docs/results/quality.md)

Every row starts from the same warm-start student (`--warm-start`, default stage 1's export runs/deque-long-kd/final,
as in the paper, where stage 2 starts from stage 1's model; a missing `runs/NAME/final` is trained first with
CONFIGS/stage1_kd.yaml as run NAME, after `topd-ds sample`; `--warm-start models/deque/student` for the old order)
and runs `topd-ds train` with CONFIGS/topd.yaml (default configs/deque-long) and `topd.mode=<row>`, so K, the
candidate fraction, lr, batch and rollouts are the same for every row. The ground-truth rows train the same
student with CE on the data's own reference traces (`train.stage=kd kd.source=dataset kd.kd_ratio=0`):
`gt_steps` for as many steps (32 sequences each) as the distillation rows, `gt_time` for as many steps as fit
in the mean wall time of the OPD runs. Pass@1 is greedy on the first `--eval-samples` held-out problems, before
and after, unless the overrides ask for the paper's sampled Pass@1 (`-- train.eval_n=4 train.eval_temperature=1.0`:
the mean over 4 samples per problem). Each finished run is appended at once as one JSON line to OUT/runs.jsonl
(name, row, seed, settings, before, after, steps, training seconds excluding evals, tokens generated and
trained) and copied to docs/records/OUTNAME.runs.jsonl (`--records`, committed); a run already there (or whose
summary.json exists) is not rerun, so an interrupted study continues where it stopped. Prints markdown tables
(per row mean, SD over seeds, SE; per pair of rows the paired difference, its SE, t and 95% t interval) and
writes results.json. `--eval-set val` scores on the validation split (choose hyperparameters there, report on
the test split). docs/FIDELITY.md has the deque testbed's tables and the campaign's command.
"""

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import yaml

from topd_ds.studies.stats import paired_difference, row_stats

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
    # time/step_s excludes evals and start-up (train.py, issue 25); the token counts are the machine-independent
    # cost: tokens sampled by the servers (rollouts + probes) and tokens through the student's forward/backward
    hist = s["history"]
    wall = sum(h.get("time/step_s", 0.0) for h in hist)
    return {"before": ev[min(ev)], "after": ev[max(ev)], "steps": s["steps"], "train_wall_s": wall,
            "tokens_generated": sum(h.get("cost/tokens_generated", 0.0) for h in hist),
            "tokens_trained": sum(h.get("cost/tokens_trained", 0.0) for h in hist)}


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
    if getattr(args, "records", ""):  # the committed copy of the raw records (docs/records/): tables can be recomputed
        dst = os.path.join(REPO, args.records, os.path.basename(os.path.normpath(args.out)) + ".runs.jsonl")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(runs_file(args), dst + ".tmp")
        os.replace(dst + ".tmp", dst)


def run_name(args, row, seed) -> str:
    """val- (runs scored on the validation split), then the tag, the row and the seed."""
    return f"{'val-' if args.eval_set == 'val' else ''}{args.tag + '-' if args.tag else ''}{row}-s{seed}"


def val_path(args) -> str:
    """The validation split beside the config's eval set (scripts/deque_split.py --n-val): disjoint from the
    reported eval set and from the train prompts, for choosing lr, lambda and the like."""
    with open(os.path.join(REPO, args.configs, "topd.yaml")) as f:
        test = yaml.safe_load(f)["data"]["eval"]
    return os.path.join(os.path.dirname(test), "val.jsonl")


def eval_override(args) -> list:
    return [f"data.eval={val_path(args)}"] if args.eval_set == "val" else []


def table_stats(table: dict) -> dict:
    """Per row: n, mean, SD over seeds, SE of the mean (pass@1 %). Per pair of rows (a, b) in row order: the
    mean of a - b over the seeds both ran (paired: same seed = same prompts and rollout seeds), its SE, t, df,
    p and the 95% t interval (topd_ds.studies.stats)."""
    rows = {row: row_stats(t["after"]) for row, t in table.items()}
    pairs = {}
    for a, b in itertools.combinations(table, 2):
        seeds = [sd for sd in table[a]["seeds"] if sd in table[b]["seeds"]]
        if len(seeds) < 2:
            continue
        pick = lambda r: [table[r]["after"][table[r]["seeds"].index(sd)] for sd in seeds]  # noqa: E731
        pairs[f"{a} - {b}"] = dict(paired_difference(pick(a), pick(b)), seeds=seeds)
    return {"rows": rows, "pairs": pairs}


def stats_markdown(stats: dict) -> str:
    """The two tables, each column named: SD is the spread over seeds, SE the standard error of the mean."""
    out = ["| row | n seeds | mean pass@1 % | SD over seeds | SE of the mean |", "|---|---|---|---|---|"]
    out += [f"| {row} | {r['n']} | {r['mean']:.1f} | {r['sd']:.1f} | {r['se']:.1f} |"
            for row, r in stats["rows"].items()]
    out += ["", "| pair (a - b, paired over seeds) | n | mean difference | SD of differences | SE | t | df | p | 95% "
            "interval (t) |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {k} | {p['n']} | {p['mean']:+.1f} | {p['sd']:.1f} | {p['se']:.1f} | {p['t']:.2f} | {p['df']} | "
            f"{p['p']:.3f} | [{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}] |" for k, p in stats["pairs"].items()]
    return "\n".join(out)


def run_row(args, row, seed, steps=None):
    name = run_name(args, row, seed)
    done = finished_runs(args)
    if name in done:
        print(f"{name}: done already ({runs_file(args)})", flush=True)
        return done[name]
    if os.path.exists(summary_path(args, name)):  # finished before runs.jsonl existed
        print(f"{name}: done already", flush=True)
        result = dict(read_summary(args, name), **run_meta(args, name, row, seed))
        append_run(args, result)
        return result
    common = [f"model.student={args.warm_start}", f"train.seed={seed}", f"train.run_name={name}",
              f"train.out_dir={args.out}", f"train.eval_samples={args.eval_samples}", "train.save_every=0",
              f"train.lr={args.lr}", *eval_override(args)]
    if row in DISTILL_ROWS:
        train(args, "--config", os.path.join(args.configs, "topd.yaml"), f"topd.mode={row}",
              f"train.steps={args.steps}", *common, *args.overrides)
    else:
        train(args, "--config", os.path.join(args.configs, "stage1_kd.yaml"), "kd.source=dataset", "kd.kd_ratio=0",
              "kd.n_samples=0", f"train.steps={steps or args.steps}", *common, *args.overrides)
    result = dict(read_summary(args, name), **run_meta(args, name, row, seed))
    append_run(args, result)
    return result


def run_meta(args, name, row, seed) -> dict:
    """What a record needs to be re-checked on its own: the run, the eval split, the settings."""
    return {"name": name, "row": row, "seed": seed, "eval_set": args.eval_set, "eval_samples": args.eval_samples,
            "lr": args.lr, "warm_start": args.warm_start, "overrides": list(args.overrides)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=ALL_ROWS)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per distillation run")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--warm-start", default="runs/deque-long-kd/final",
                    help="the student every row starts from; default stage 1's export (the paper's order: stage 2 "
                         "from stage 1's model), trained first from models/deque/student if missing")
    ap.add_argument("--configs", default="configs/deque-long", help="folder with the task's topd.yaml and stage1_kd.yaml")
    ap.add_argument("--out", default="runs/replicate-deque-long")
    ap.add_argument("--tag", default="", help="prefix of the run names (sweeps)")
    ap.add_argument("--eval-set", choices=("test", "val"), default="test",
                    help="val: score on the validation split beside data.eval (val.jsonl, disjoint from the "
                         "reported eval set; choose lr / lambda there); run names get a val- prefix")
    ap.add_argument("--records", default="docs/records",
                    help="folder for the committed copy of OUT/runs.jsonl (OUTNAME.runs.jsonl); '' for none")
    ap.add_argument("overrides", nargs="*", help="extra key.path=value overrides for every run")
    args = ap.parse_args()
    t0 = time.time()
    if args.eval_set == "val" and not os.path.isfile(os.path.join(REPO, val_path(args))):
        raise SystemExit(f"--eval-set val: {val_path(args)} missing (scripts/deque_split.py --n-val writes it)")
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
                      [read_summary(args, run_name(args, "opd", seed))]
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
                      "steps": [r["steps"] for r in runs], "train_wall_s": [r["train_wall_s"] for r in runs],
                      "tokens_generated": [r.get("tokens_generated", 0.0) for r in runs],
                      "tokens_trained": [r.get("tokens_trained", 0.0) for r in runs]}
    stats = table_stats(table)
    suffix = ("-val" if args.eval_set == "val" else "") + ("-" + args.tag if args.tag else "")
    out = os.path.join(REPO, args.out, f"results{suffix}.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": vars(args), "rows": table, "stats": stats, "wall_s": time.time() - t0}, f, indent=1)
    os.replace(tmp, out)

    print(f"\n| row | pass@1 % after, mean +- std over seeds {args.seeds} | per seed | steps | train s |")
    print("|---|---|---|---|---|")
    before = [b for row in table.values() for b in row["before"]]
    print(f"| warm start | {statistics.mean(before):.1f} | {' / '.join(f'{b:.1f}' for b in before[:len(args.seeds)])} | 0 | 0 |")
    for row, t in table.items():
        print(f"| {row} | {t['mean']:.1f} +- {t['std']:.1f} | {' / '.join(f'{a:.1f}' for a in t['after'])} | "
              f"{'/'.join(map(str, sorted(set(t['steps']))))} | {statistics.mean(t['train_wall_s']):.0f} |")
    print("\ncost per run (mean over seeds): training seconds exclude evals and start-up; "
          "tokens are machine-independent")
    print("| row | train s | tokens generated | tokens trained |\n|---|---|---|---|")
    for row, t in table.items():
        print(f"| {row} | {statistics.mean(t['train_wall_s']):.0f} | {statistics.mean(t['tokens_generated']):.0f} | "
              f"{statistics.mean(t['tokens_trained']):.0f} |")
    print("\n" + stats_markdown(stats))
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
