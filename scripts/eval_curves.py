"""Learning curves from runs trained with `train.eval_every`: pass@1 at every evaluated step, per setting (a run name
without its seed) and seed, with the mean over seeds; writes them as a committed record and prints a markdown table.

    .venv/bin/python scripts/eval_curves.py --runs runs/campaign-deque-long/val-curve-* \
        --json docs/records/curves-deque-long.json
"""

import argparse
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from topd_ds.checkpoint import write_json_atomic  # noqa: E402


def read_curves(run_dirs) -> dict:
    """{setting: {seed: {step: pass@1 in %}}} from each run's summary.json (its `eval` by step)."""
    out = {}
    for d in run_dirs:
        name = os.path.basename(os.path.normpath(d))
        m = re.fullmatch(r"(.*)-s(\d+)", name)
        if not m:
            raise SystemExit(f"--runs: {d}: expected a run named SETTING-sSEED")
        with open(os.path.join(d, "summary.json")) as f:
            ev = json.load(f)["eval"]
        out.setdefault(m.group(1), {})[int(m.group(2))] = {int(k): 100 * ev[k] for k in sorted(ev, key=int)}
    return out


def markdown(curves: dict) -> str:
    settings = sorted(curves)
    steps = sorted({s for c in curves.values() for run in c.values() for s in run})
    head = " | ".join(f"{s} (mean of {len(curves[s])} seeds; per seed)" for s in settings)
    lines = [f"| step | {head} |", "|---" * (1 + len(settings)) + "|"]
    for step in steps:
        cells = []
        for s in settings:
            vals = [run[step] for _, run in sorted(curves[s].items()) if step in run]
            cells.append(f"{statistics.mean(vals):.1f} ({' / '.join(f'{v:.1f}' for v in vals)})" if vals else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (each with summary.json)")
    ap.add_argument("--json", help="write the curves here (a committed record)")
    args = ap.parse_args(argv)
    curves = read_curves(args.runs)
    if args.json:
        write_json_atomic(args.json, {"runs": args.runs, "curves": curves})
    print(markdown(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
