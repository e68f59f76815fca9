"""`topd-ds local-correction`: does TOPD move the student's near future toward the teacher's? (paper Sec 5.2, Fig 5)

    topd-ds local-correction --config configs/demo/topd.yaml --out runs/local [--samples 200] [--updates 5]

1. Divergence points: the student rolls out, the teacher scores, the high-loss candidates of each sequence are
   probed (as in training) and labelled; per sequence the real divergent point (not a false alarm) with the
   largest D_OT is kept, until --samples are found. Its prefix x_<t is fixed, and the teacher's K-token
   continuation from it is the correction window (K = topd.window).
2. From the same starting weights (a plain transformers copy of model.student, float32), --updates AdamW steps
   (lr train.lr unless --lr) on the sequence prefix + teacher window, loss on the window only, with the
   trainer's own objective: OPD = reverse KL per window token (opd.estimator), TOPD = the same plus
   topd.lam x L_traj with the OT plan between the teacher window and the student's probe continuation.
3. Before and after each method, the student regenerates K tokens from the prefix (topd.probe_temperature,
   --regen samples with the same seeds for before/OPD/TOPD) and D_OT to the teacher window is measured.
Writes local_correction.json (means, medians, per-sample values), local_correction.png and tb/.
"""

import argparse
import copy
import dataclasses
import os
import time

import numpy as np
import torch

from topd_ds.rollout.batch import Batch, Windows
from topd_ds.checkpoint import write_json_atomic
from topd_ds.errors import TopdError
from topd_ds.rollout.pipeline import window_ot
from topd_ds.studies import plots, stats
from topd_ds.studies.session import add_common_args, load_study_config, open_session

METHODS = ("opd", "topd")
PAPER = {"before": 0.538, "opd": 0.350, "topd": 0.204}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds local-correction", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--samples", type=int, default=200, help="divergence points (paper: 1000)")
    ap.add_argument("--updates", type=int, default=5, help="M consecutive updates per point (paper: 5)")
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr of the local updates (default train.lr)")
    ap.add_argument("--regen", type=int, default=1, help="regenerations per measurement, D_OT averaged")
    ap.add_argument("--max-batches", type=int, default=100, help="give up finding points after this many batches")
    args = ap.parse_args(argv)
    for name in ("samples", "updates", "regen", "max_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def find_divergence_points(session, n: int, max_batches: int) -> list:
    """Up to n real divergent points, one per sequence: the session builds batches in "topd" mode, so
    batch.windows holds the high-loss candidates the trainer labels real (not false alarms), with their
    probe windows, plan and D_OT; per sequence the one with the largest D_OT is kept."""
    found = []
    for step in range(max_batches):
        batch = session.batch(step)
        w = batch.windows
        if w is None:
            continue
        for b in sorted(set(w.seq_index.tolist())):
            rows = ((w.seq_index == b) & w.teacher_mask.any(-1)).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            m = int(rows[w.d_ot[rows].argmax()])
            point = Windows(**{f.name: getattr(w, f.name)[m:m + 1] for f in dataclasses.fields(Windows)})
            point.seq_index = torch.tensor([0])  # row 0 of its own one-sequence batch (window_batch)
            found.append({"prefix": batch.sequences[b][:int(w.position[m])], "window": point})
            if len(found) == n:
                return found
    return found


def window_batch(session, point) -> Batch:
    """prefix + teacher window as a one-sequence Batch whose response is the window (the loss mask), scored by
    the teacher, with the probe's OT plan as its one trajectory window."""
    w = point["window"]
    teacher_window = w.teacher_ids[0][w.teacher_mask[0]].tolist()
    batch = Batch(step=0, weight_version=0, sequences=[point["prefix"] + teacher_window],
                  prompt_lens=[len(point["prefix"])], windows=w)
    session.pipeline.call(session.pipeline.score(batch))
    return batch


@torch.no_grad()
def regenerate_distance(model, session, point, *, regen: int, seed: int) -> float:
    """Mean D_OT between the teacher window and `regen` fresh K-token student continuations of the prefix."""
    cfg, tok = session.cfg, session.tokenizer
    k = cfg.topd.window
    ids = torch.tensor([point["prefix"]] * regen)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                         temperature=cfg.topd.probe_temperature, max_new_tokens=k,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    s_ids = torch.full((regen, k), tok.pad_token_id, dtype=torch.long)
    s_mask = torch.zeros((regen, k), dtype=torch.bool)
    for r, row in enumerate(out.tolist()):
        row = row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        s_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        s_mask[r, :len(row)] = True
    w = point["window"]
    result = window_ot(session.embedding, w.teacher_ids.expand(regen, -1), w.teacher_mask.expand(regen, -1),
                       s_ids, s_mask, cfg)
    return float(result.distance.mean())


def local_updates(model, batch, cfg, *, updates: int, lr: float, teacher_head, pad_id: int) -> list:
    """`updates` AdamW steps on the batch's window with cfg.topd.mode's objective; returns the losses."""
    from topd_ds.loss.objective import stage2_loss

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    out = []
    for _ in range(updates):
        loss, _ = stage2_loss(model, batch, [0], cfg=cfg, teacher_head=teacher_head, pad_id=pad_id, device="cpu")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def run_study(session, points, *, updates: int, lr: float, regen: int) -> list:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = session.cfg
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model.student, dtype=torch.float32)
    model.train(False)  # no dropout: the updates are the only change
    start = copy.deepcopy(model.state_dict())
    rows = []
    for i, point in enumerate(points):
        batch = window_batch(session, point)
        seed = cfg.train.seed * 1_000_003 + i
        w = point["window"]
        row = {"probe_d_ot": float(w.d_ot[0]), "prefix": point["prefix"],
               "teacher_window": batch.sequences[0][len(point["prefix"]):],
               "student_window": w.student_ids[0][w.student_mask[0]].tolist(),
               "before": regenerate_distance(model, session, point, regen=regen, seed=seed)}
        for method in METHODS:
            model.load_state_dict(start)
            mcfg = dataclasses.replace(cfg, topd=dataclasses.replace(cfg.topd, mode=method))
            row[f"{method}_losses"] = local_updates(model, batch, mcfg, updates=updates, lr=lr,
                                                    teacher_head=session.teacher_head,
                                                    pad_id=session.tokenizer.pad_token_id)
            row[method] = regenerate_distance(model, session, point, regen=regen, seed=seed)
        model.load_state_dict(start)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_study_config(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    lr = args.lr if args.lr is not None else cfg.train.lr
    with open_session(cfg, mode="topd") as session:
        points = find_divergence_points(session, args.samples, args.max_batches)
        print(f"local-correction: {len(points)} divergence points ({time.perf_counter() - t0:.0f}s)", flush=True)
        if not points:
            raise TopdError("no real divergence point found (raise --max-batches or topd.candidate_fraction)")
        rows = run_study(session, points, updates=args.updates, lr=lr, regen=args.regen)
    values = {key: [r[key] for r in rows] for key in ("before",) + METHODS}
    result = {
        "n": len(rows), "updates": args.updates, "lr": lr, "regen": args.regen, "window": cfg.topd.window,
        "lam": cfg.topd.lam, "summary": {k: stats.summary(v) for k, v in values.items()},
        "mean": {k: float(np.mean(v)) for k, v in values.items()},
        "topd_below_opd_fraction": float(np.mean([r["topd"] < r["opd"] for r in rows])),
        "paper_mean": PAPER, "wall_s": time.perf_counter() - t0, "config": args.config,
        "overrides": args.overrides, "samples": rows,
    }
    fig = plots.distributions({"before": values["before"], "after OPD": values["opd"],
                               "after TOPD": values["topd"]}, os.path.join(args.out, "local_correction.png"),
                              title=f"Local trajectory correction: {len(rows)} divergent prefixes, "
                                    f"M={args.updates} updates")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(args.out, "tb")) as writer:
        for k, v in values.items():
            writer.add_scalar(f"local_correction/mean_d_ot_{k}", float(np.mean(v)))
            writer.add_histogram(f"local_correction/d_ot_{k}", np.array(v))
        writer.add_figure("local_correction/distributions", fig)
    write_json_atomic(os.path.join(args.out, "local_correction.json"), result)
    print(f"{'mean D_OT':<14}{'this run':>10}{'paper':>8}")
    for k in ("before",) + METHODS:
        print(f"{k:<14}{result['mean'][k]:>10.3f}{PAPER[k]:>8.3f}")
    print(f"TOPD below OPD on {100 * result['topd_below_opd_fraction']:.0f}% of the points; wrote "
          f"{args.out}/local_correction.json, local_correction.png, tb/ ({result['wall_s']:.0f}s)")
    return 0
