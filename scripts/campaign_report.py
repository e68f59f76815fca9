"""The fidelity campaign's tables, recomputed from the committed raw records (docs/records/*.runs.jsonl): what
docs/FIDELITY.md shows for scripts/campaign.py, so anyone can check it without the ignored runs/ folder.

    .venv/bin/python scripts/campaign_report.py                                   # docs/records/campaign-deque-long
    .venv/bin/python scripts/campaign_report.py --records docs/records/X.runs.jsonl --delta 3

A setting is a run name without its seed (`val-lr2e-05-opd-s100` -> `val-lr2e-05-opd`). Prints, as markdown:
1. the validation sweep (eval_set val): per setting n seeds, mean pass@1, SD over seeds, SE of the mean, the warm
   start's pass@1, and the cost per run (tokens generated + tokens trained, machine-independent; training seconds);
   and every validation setting against the best validation OPD setting, paired over the seeds both ran;
2. the test-split rows with their paired statistics (scripts/replicate.py's table_stats): every row against OPD
   and against the warm start (its `before`, the same greedy score for every seed), over the seeds both ran;
3. the seed count a `--delta`-point paired difference with OPD needs at 80% power, from the largest paired SD.
"""

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from topd_ds.studies.stats import row_stats, seeds_for_power  # noqa: E402


def _replicate():
    spec = importlib.util.spec_from_file_location("replicate_script", os.path.join(REPO, "scripts", "replicate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_records(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def setting_of(record: dict) -> str:
    """The run's name without its seed suffix."""
    return re.sub(r"-s\d+$", "", record["name"])


def group(records) -> dict:
    """setting -> {"seeds", "after", "before", "cost", "wall_s"} (pass@1 in %, seeds ascending; a run recorded
    twice keeps its last record)."""
    by = {}
    for r in records:
        by.setdefault(setting_of(r), {})[r["seed"]] = r
    out = {}
    for name, runs in by.items():
        seeds = sorted(runs)
        out[name] = {"seeds": seeds, "after": [100 * runs[s]["after"] for s in seeds],
                     "before": [100 * runs[s]["before"] for s in seeds],
                     "cost": [runs[s]["tokens_generated"] + runs[s]["tokens_trained"] for s in seeds],
                     "wall_s": [runs[s]["train_wall_s"] for s in seeds],
                     "eval_set": runs[seeds[0]]["eval_set"]}
    return out


def sweep_markdown(groups: dict) -> str:
    out = ["| setting (validation split) | n seeds | mean pass@1 % | SD over seeds | SE of the mean | warm start % | "
           "tokens generated + trained per run (mean) | training s per run (mean) |", "|---|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        if g["eval_set"] != "val":
            continue
        r = row_stats(g["after"])
        out.append(f"| {name} | {r['n']} | {r['mean']:.1f} | {r['sd']:.1f} | {r['se']:.1f} | "
                   f"{statistics.mean(g['before']):.1f} | {statistics.mean(g['cost']):,.0f} | "
                   f"{statistics.mean(g['wall_s']):.0f} |")
    return "\n".join(out)


def val_pairs_markdown(groups: dict) -> str:
    """Every validation setting against the best validation OPD setting (the campaign's lr pick), paired over the
    seeds both ran (same seed = same prompts and rollout seeds)."""
    from topd_ds.studies.stats import paired_difference

    val = {n: g for n, g in groups.items() if g["eval_set"] == "val"}
    opd = {n: g for n, g in val.items() if n.endswith("-opd")}
    if not opd:
        return ""
    base = max(opd, key=lambda n: statistics.mean(opd[n]["after"]))
    out = [f"| validation setting - {base} (paired) | seeds | mean difference | SD of differences | SE | 95% interval (t) |",
           "|---|---|---|---|---|---|"]
    for name, g in val.items():
        seeds = [sd for sd in g["seeds"] if sd in val[base]["seeds"]]
        if name == base or len(seeds) < 2:
            continue
        pick = lambda h: [h["after"][h["seeds"].index(sd)] for sd in seeds]  # noqa: E731
        p = paired_difference(pick(g), pick(val[base]))
        out.append(f"| {name} | {' '.join(map(str, seeds))} | {p['mean']:+.1f} | {p['sd']:.1f} | {p['se']:.1f} | "
                   f"[{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}] |")
    return "\n".join(out)


def test_table(groups: dict) -> dict:
    """replicate.table_stats' input for the test-split settings, OPD first, with the warm start as a row."""
    test = {name: g for name, g in groups.items() if g["eval_set"] != "val"}
    if not test:
        return {}
    order = sorted(test, key=lambda n: (n != "opd", n))
    table = {n: {"seeds": test[n]["seeds"], "after": test[n]["after"]} for n in order}
    first = test[order[0]]
    table["warm start"] = {"seeds": first["seeds"], "after": first["before"]}
    return table


def cost_markdown(groups: dict) -> str:
    out = ["| row (test split) | tokens generated + trained per run (mean) | relative to OPD | training s per run (mean) |",
           "|---|---|---|---|"]
    test = {n: g for n, g in groups.items() if g["eval_set"] != "val"}
    base = statistics.mean(test["opd"]["cost"]) if "opd" in test else None
    for name in sorted(test, key=lambda n: (n != "opd", n)):
        c = statistics.mean(test[name]["cost"])
        rel = f"{c / base:.2f}x" if base else "-"
        out.append(f"| {name} | {c:,.0f} | {rel} | {statistics.mean(test[name]['wall_s']):.0f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=os.path.join(REPO, "docs/records/campaign-deque-long.runs.jsonl"))
    ap.add_argument("--delta", type=float, default=3.0, help="the paired difference (points) to resolve")
    args = ap.parse_args(argv)
    groups = group(read_records(args.records))
    print(sweep_markdown(groups))
    pairs = val_pairs_markdown(groups)
    if pairs:
        print()
        print(pairs)
    table = test_table(groups)
    if not table:
        return
    rep = _replicate()
    stats = rep.table_stats(table)
    print()
    print(rep.stats_markdown(stats))
    print()
    print(cost_markdown(groups))
    with_opd = [p for k, p in stats["pairs"].items() if k.startswith("opd - ") and not k.endswith("warm start")]
    if with_opd:
        widest = max(with_opd, key=lambda p: p["sd"])
        print(f"\nlargest paired SD with OPD: {widest['sd']:.2f} points over {widest['n']} seeds -> "
              f"{seeds_for_power(widest['sd'], args.delta)} seeds for a {args.delta:g}-point difference at 80% power")


if __name__ == "__main__":
    main()
