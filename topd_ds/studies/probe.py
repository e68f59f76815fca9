"""`topd-ds probe`: is a high-loss token a trajectory divergence? (paper Sec 2.1, Fig 2, Fig 4, Appendix A Fig 6)

    topd-ds probe --config configs/demo/topd.yaml --out runs/probe [--batches 8] [key.path=value ...]

The student rolls out on the config's prompts (rollout.*), the teacher scores every response token, and in
each sequence the same number of positions is picked three ways: highest token loss, uniformly at random, and
lowest token loss (topd.candidate_fraction or topd.candidate_count per sequence). From each position's prefix
x_<t both models continue topd.window tokens (topd.probe_temperature) and the short-window OT distance between
the two continuations is computed (topd.cost, ot.*). Token loss is the per-token reverse KL the trainer ranks
by (opd.estimator's teacher distribution against the student's top-k); the teacher's NLL of the sampled token
is kept too. Reported: per-group medians, Pearson and Spearman between token loss and D_OT over the high-loss
positions, and the share of high-loss positions inside the low-divergence range (D_OT at or below the upper
quartile of the low-loss group's). Writes probe.json (every point with its windows), probe_distributions.png,
probe_scatter.png and TensorBoard events in <out>/tb.
"""

import argparse
import os
import time

import numpy as np
import torch

from topd_ds.rollout import divergence
from topd_ds.checkpoint import write_json_atomic
from topd_ds.rollout.pipeline import stack_ragged
from topd_ds.studies import plots, stats
from topd_ds.studies.session import add_common_args, load_study_config, open_session

GROUPS = ("high", "random", "low")
LABELS = {"high": "high-loss", "random": "random", "low": "low-loss"}
PAPER = {"median_high": 0.566, "median_random": 0.361, "median_low": 0.315, "pearson": 0.126, "spearman": 0.143,
         "low_divergence_fraction": 0.2923}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds probe", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--batches", type=int, default=8,
                    help="rollout batches of rollout.prompts_per_step x rollout.n_per_prompt sequences")
    return ap.parse_args(argv)


def select_groups(token_loss, mask, cfg, generator) -> dict:
    """{group: (B, R) bool} with the same count per sequence in every group."""
    count = cfg.topd.candidate_count or None
    fraction = None if count else cfg.topd.candidate_fraction
    return {g: divergence.select_candidates(token_loss, mask, fraction=fraction, count=count, mode=g,
                                            generator=generator) for g in GROUPS}


def probe_batch(session, batch, generator) -> dict:
    """{group: list of point dicts} for one scored batch."""
    loss, mask = stack_ragged(batch.selection_score)                      # (B, R)
    nll, _ = stack_ragged([-lp for lp in batch.teacher_token_logprobs])   # (B, R)
    points = {}
    for group, selected in select_groups(loss, mask, session.cfg, generator).items():
        w = session.solve(session.probe(batch, selected))
        points[group] = [
            {"seq": int(b), "position": int(t), "token_loss": float(loss[b, t - batch.prompt_lens[b]]),
             "teacher_nll": float(nll[b, t - batch.prompt_lens[b]]), "d_ot": float(d),
             "teacher_window": w.teacher_ids[m][w.teacher_mask[m]].tolist(),
             "student_window": w.student_ids[m][w.student_mask[m]].tolist()}
            for m, (b, t, d) in enumerate(zip(w.seq_index.tolist(), w.position.tolist(), w.d_ot.tolist()))]
    return points


def analyse(points: dict) -> dict:
    """The paper's numbers from the probed points."""
    d = {g: [p["d_ot"] for p in points[g]] for g in GROUPS}
    high_loss = [p["token_loss"] for p in points["high"]]
    high_nll = [p["teacher_nll"] for p in points["high"]]
    pooled = [p for g in GROUPS for p in points[g]]
    frac, upper = stats.low_divergence_fraction(d["high"], d["low"])
    return {
        "groups": {g: stats.summary(d[g]) for g in GROUPS},
        "pearson": stats.pearson(high_loss, d["high"]),
        "spearman": stats.spearman(high_loss, d["high"]),
        "pearson_teacher_nll": stats.pearson(high_nll, d["high"]),
        "spearman_teacher_nll": stats.spearman(high_nll, d["high"]),
        "pearson_all_groups": stats.pearson([p["token_loss"] for p in pooled], [p["d_ot"] for p in pooled]),
        "spearman_all_groups": stats.spearman([p["token_loss"] for p in pooled], [p["d_ot"] for p in pooled]),
        "low_divergence_upper_quartile": upper,
        "low_divergence_fraction": frac,
    }


def write_figures(points: dict, result: dict, out: str, writer=None):
    d = {g: np.array([p["d_ot"] for p in points[g]]) for g in GROUPS}
    fig1 = plots.distributions({LABELS[g]: d[g] for g in GROUPS}, os.path.join(out, "probe_distributions.png"),
                               title="Near-future divergence at high-loss, random and low-loss positions")
    x = np.array([p["token_loss"] for p in points["high"]])
    bx, by = stats.binned_means(x, d["high"], bins=10)
    fig2 = plots.scatter_with_trend(
        x, d["high"], bx, by, os.path.join(out, "probe_scatter.png"), xlabel="token loss (reverse KL)",
        ylabel="short-window OT distance",
        title=f"high-loss positions: Pearson r={result['pearson']:.3f}, Spearman rho={result['spearman']:.3f}")
    if writer is not None:
        writer.add_figure("probe/distributions", fig1)
        writer.add_figure("probe/scatter", fig2)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_study_config(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    points = {g: [] for g in GROUPS}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    with open_session(cfg) as session:
        for step in range(args.batches):
            batch = session.batch(step)
            for group, pts in probe_batch(session, batch, generator).items():
                for p in pts:
                    p["seq"] += step * len(batch.sequences)  # unique over the whole study
                points[group].extend(pts)
            print(f"probe: batch {step + 1}/{args.batches}: {len(points['high'])} positions per group "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    result = analyse(points)
    result.update(paper=PAPER, batches=args.batches, window=cfg.topd.window, wall_s=time.perf_counter() - t0,
                  config=args.config, overrides=args.overrides)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(args.out, "tb")) as writer:
        for g in GROUPS:
            writer.add_scalar(f"probe/median_d_ot_{g}", result["groups"][g]["median"])
            writer.add_histogram(f"probe/d_ot_{g}", np.array([p["d_ot"] for p in points[g]]))
        for key in ("pearson", "spearman", "low_divergence_fraction"):
            writer.add_scalar(f"probe/{key}", result[key])
        write_figures(points, result, args.out, writer)
    write_json_atomic(os.path.join(args.out, "probe.json"), {**result, "points": points})

    g = result["groups"]
    print(f"{'':<10}{'this run':>12}{'paper':>10}")
    for name in GROUPS:
        print(f"median {name:<8}{g[name]['median']:>10.3f}{PAPER['median_' + name]:>10.3f}  (n={g[name]['n']})")
    print(f"{'pearson':<15}{result['pearson']:>10.3f}{PAPER['pearson']:>10.3f}")
    print(f"{'spearman':<15}{result['spearman']:>10.3f}{PAPER['spearman']:>10.3f}")
    print(f"{'low-range %':<15}{100 * result['low_divergence_fraction']:>10.2f}"
          f"{100 * PAPER['low_divergence_fraction']:>10.2f}")
    print(f"wrote {args.out}/probe.json, probe_distributions.png, probe_scatter.png, tb/ "
          f"({result['wall_s']:.0f}s)")
    return 0
