"""`topd-ds filter-study`: does the bottom-q D_OT filter find the benign alternatives? (issue 18, beyond the paper)

    topd-ds filter-study --config configs/deque/topd.yaml --out runs/studies/filter-deque [--batches 8]
        [--windows 4 8 16 24] [--task deque] [key.path=value ...]

TOPD drops the high-loss candidates whose short-window OT distance is in the bottom q (topd.false_alarm_quantile)
as false alarms: tokens where the student took another valid path, not an error. The paper can argue this only
indirectly. On a task with a checker (`deque.valid_next`) every candidate has a ground-truth label:

    benign   the student's token keeps the trace on a valid derivation and is not the teacher's argmax
    error    the student's token leaves every valid derivation
    teacher  the student's token is the teacher's argmax (rare at high-loss positions)
    (candidates whose prefix already left a valid derivation have no label and are left out)

The study builds rollouts and picks the candidates exactly as training does (Pipeline.build, topd.candidate_fraction
by the selection score), probes both models once with the longest window, and flags round(q * M) candidates per
batch with each detector:

    D_OT        bottom q of the OT distance between the windows truncated to K tokens, for each K in --windows
                and each ground cost: cosine and squared Euclidean on the configured embeddings, and one-hot
                (0 for the same token, 1 otherwise: the embeddings left out);
    D_state     bottom q of the task's own state distance after the windows (deque: how many digits the two
                derivations have taken differently; a window that left a valid derivation counts as maximal);
    baselines   the same budget with no probe: highest teacher entropy at the position, highest teacher
                probability of the student's token, smallest teacher top-2 margin; and chance;
    checker     the student's own probability mass on tokens the checker calls invalid at the position (lowest
                flagged): what a student that "knows" the task puts on errors there (issue 25).

Reported per detector: precision (benign share of the flagged), recall (share of the benign flagged), and the
share of the errors it flags (errors dropped from training). Writes filter.json (every candidate, every score)
and prints a markdown table.
"""

import argparse
import dataclasses
import math
import os
import time

import numpy as np
import torch

from topd_ds.rollout import divergence
from topd_ds.rollout.batch import Windows
from topd_ds.checkpoint import write_json_atomic
from topd_ds.errors import ConfigError
from topd_ds.rollout.pipeline import stack_ragged, window_ot
from topd_ds.studies.filter_labelled import (STUDENT_INVALID, analyse_labelled, is_benign, low_is_benign,
                                             markdown_labelled)
from topd_ds.studies.session import add_common_args, load_study_config, open_session

TASKS = ("deque", "deque_alt")  # deque_alt: surface-form alternatives that re-converge (issue 25)
COSTS = ("cosine", "sqeuclidean", "onehot")
BASELINES = ("teacher_entropy", "teacher_prob_of_token", "teacher_top2_margin")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="topd-ds filter-study", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--batches", type=int, default=8,
                    help="rollout batches of rollout.prompts_per_step x rollout.n_per_prompt sequences")
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 24], help="window lengths K compared (the longest prefix + K must fit the models' positions)")
    ap.add_argument("--task", default="deque", choices=TASKS, help="the task whose checker labels the tokens")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------- labels and scores


def token_label(allowed, token: str, teacher_argmax: str):
    """'benign' | 'error' | 'teacher' for a token after a prefix whose valid next tokens are `allowed`
    (None: the prefix already left a valid derivation -> None, no label)."""
    if allowed is None:
        return None
    if token not in allowed:
        return "error"
    return "teacher" if token == teacher_argmax else "benign"


def teacher_position_scores(logits: torch.Tensor, token_ids: torch.Tensor) -> dict:
    """The no-probe detectors from the teacher's logits at the candidates. (M, V), (M,) -> {name: (M,)}, each
    oriented so that a HIGHER score means 'more likely benign' (flagged first)."""
    logp = torch.log_softmax(logits.double(), dim=-1)                    # (M, V)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values                                      # (M, 2)
    return {"teacher_entropy": -(p * logp).sum(-1),
            "teacher_prob_of_token": p.gather(1, token_ids[:, None])[:, 0],
            "teacher_top2_margin": -(top2[:, 0] - top2[:, 1])}


def invalid_mass(logits: torch.Tensor, allowed_ids) -> float:
    """The probability mass a model's next-token logits (V,) put outside `allowed_ids` (the checker's valid next
    tokens); NaN where the checker has no answer (None: the prefix already left a valid derivation)."""
    if allowed_ids is None:
        return float("nan")
    p = torch.softmax(logits.double(), dim=-1)
    return float(1.0 - p[list(allowed_ids)].sum()) if allowed_ids else 1.0


def student_position_logits(student, sequences: list, positions: list) -> torch.Tensor:
    """(M, V) the student's logits for token `positions[m]` of `sequences[m]` (given the tokens before it), one
    forward per distinct sequence."""
    out = [None] * len(positions)
    by_seq = {}
    for m, (ids, t) in enumerate(zip(sequences, positions)):
        by_seq.setdefault(id(ids), (ids, []))[1].append((m, t))
    with torch.no_grad():
        for ids, items in by_seq.values():
            last = max(t for _, t in items)
            logits = student(torch.tensor([ids[:last]])).logits[0]                 # (last, V)
            for m, t in items:
                out[m] = logits[t - 1]
    return torch.stack(out)


def flag_top(score: torch.Tensor, count: int) -> torch.Tensor:
    """(M,) bool: the `count` highest scores (ties broken by position, deterministic)."""
    out = torch.zeros(score.numel(), dtype=torch.bool)
    if count > 0:
        out[torch.sort(score.double(), stable=True, descending=True).indices[:count]] = True
    return out


def deque_state_distance(prompt: str, prefix: str, teacher_window: str, student_window: str, *,
                         task: str = "deque") -> float:
    """How many digits the two derivations have taken differently after prefix + window (|dleft| + |dright|
    of the deque's two ends); a window that leaves a valid derivation gets the maximum, the number of digits.
    task="deque_alt": either spelling of the ends is read as the same state."""
    from topd_ds.tasks import deque, deque_alt

    digits = deque.digits_of(prompt)
    if task == "deque_alt":
        a, b = (deque_alt._state(digits, prefix + w)[0] for w in (teacher_window, student_window))
    else:
        a, b = deque._parse(digits, prefix + teacher_window), deque._parse(digits, prefix + student_window)
    if a is None or b is None:
        return float(len(digits))
    return float(abs(a.left - b.left) + abs(a.right - b.right))


def precision_recall(flagged: np.ndarray, labels: np.ndarray) -> dict:
    """Over the labelled candidates: precision and recall of `flagged` for 'benign' (a valid token other than the
    teacher's argmax), for 'valid' (benign or the teacher's own token: no error at all, so no real divergence
    at the token), and the share of the errors flagged (real divergences the filter would drop)."""
    benign, error = labels == "benign", labels == "error"
    valid = ~error
    n_flag = int(flagged.sum())

    def ratio(a, b):
        return float(a.sum() / b.sum()) if b.any() else float("nan")
    return {"flagged": n_flag, "precision": ratio(flagged & benign, flagged), "recall": ratio(flagged & benign, benign),
            "precision_valid": ratio(flagged & valid, flagged), "recall_valid": ratio(flagged & valid, valid),
            "errors_flagged": ratio(flagged & error, error)}


# ------------------------------------------------------------------------------------------- one batch


def study_batch(session, batch, windows: list[int], generator, *, task: str = "deque", student=None) -> list[dict]:
    """One record per high-loss candidate: label, teacher scores, D_OT per (cost, K), D_state per K, and with
    `student` (the rollout policy as a local model) its mass on the tokens the checker calls invalid."""
    cfg, tok = session.cfg, session.tokenizer
    scores, mask = stack_ragged(batch.selection_score)
    count = cfg.topd.candidate_count or None
    high = divergence.select_candidates(scores, mask, fraction=None if count else cfg.topd.candidate_fraction,
                                        count=count, mode="high", generator=generator)
    w = session.probe(batch, high)                                         # windows of max(windows) tokens
    if w.seq_index.numel() == 0:
        return []
    seq_idx, pos = w.seq_index.tolist(), w.position.tolist()
    starts = [batch.prompt_lens[b] for b in seq_idx]
    hidden = torch.stack([batch.teacher_hidden[b][t - s].float() for b, t, s in zip(seq_idx, pos, starts)])
    logits = hidden @ session.teacher_head.float().T                       # (M, V)
    token_ids = torch.tensor([batch.sequences[b][t] for b, t in zip(seq_idx, pos)])
    base = teacher_position_scores(logits, token_ids)
    argmax = logits.argmax(-1).tolist()
    student_logits = (student_position_logits(student, [batch.sequences[b] for b in seq_idx], pos)
                      if student is not None else None)

    def text(ids, keep=None):
        ids = [i for i, k in zip(ids, keep if keep is not None else [True] * len(ids)) if k]
        return tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=True)

    records = []
    for m, (b, t, s) in enumerate(zip(seq_idx, pos, starts)):
        seq = batch.sequences[b]
        prompt, prefix = text(seq[:s]), text(seq[s:t])
        token, teacher_token = _char(tok, seq[t]), _char(tok, argmax[m])
        label = (token_label(_allowed(prompt, prefix), token, teacher_token) if task == "deque"
                 else _alt_label(prompt, prefix, token))
        record = {"seq": b, "position": t, "prompt": prompt, "prefix": prefix, "token": token,
                  "teacher_argmax": teacher_token, "label": label,
                  "scores": {k: float(v[m]) for k, v in base.items()}}
        if student_logits is not None:
            record["scores"][STUDENT_INVALID] = invalid_mass(student_logits[m], _allowed_ids(tok, prompt, prefix, task))
        records.append(record)
    for k in windows:
        sub = Windows(w.seq_index, w.position, w.teacher_ids[:, :k], w.teacher_mask[:, :k],
                      w.student_ids[:, :k], w.student_mask[:, :k], None, None)
        for cost in COSTS:
            if cost == "onehot":
                d = onehot_distance(sub, cfg)
            else:
                c = dataclasses.replace(cfg, topd=dataclasses.replace(cfg.topd, cost=cost))
                d = window_ot(session.embedding, sub.teacher_ids, sub.teacher_mask, sub.student_ids, sub.student_mask,
                              c).distance
            for m, r in enumerate(records):
                r["scores"][f"d_ot_{cost}_k{k}"] = float(d[m])
        for m, r in enumerate(records):
            r["scores"][f"d_state_k{k}"] = deque_state_distance(
                r["prompt"], r["prefix"], text(sub.teacher_ids[m].tolist(), sub.teacher_mask[m].tolist()),
                text(sub.student_ids[m].tolist(), sub.student_mask[m].tolist()), task=task)
    return records


def onehot_distance(w: Windows, cfg) -> torch.Tensor:
    """D_OT (M,) under the 0/1 token cost (0 for the same token, 1 otherwise), built from the ids: no (V, V)
    identity table (92 GB at V = 151,936), with the config's solver as `window_ot` uses it."""
    from topd_ds.ot import ot_distance

    cost = (w.teacher_ids[:, :, None] != w.student_ids[:, None, :]).float()          # (M, Kt, Ks)
    opts = dict(eps=cfg.ot.eps, max_iter=cfg.ot.max_iter, tol=cfg.ot.tol) if cfg.ot.solver == "sinkhorn" else {}
    return ot_distance(cost, mask_a=w.teacher_mask, mask_b=w.student_mask, solver=cfg.ot.solver, **opts).distance


def _allowed(prompt, prefix):
    from topd_ds.tasks import deque
    return deque.valid_next(prompt, prefix)


def _allowed_ids(tok, prompt, prefix, task):
    """The checker's valid next tokens after prompt + prefix as token ids (None: no valid derivation left)."""
    from topd_ds.tasks import deque
    from topd_ds.tasks.oracle_cut import CHECKERS

    allowed = CHECKERS[task].valid_next(prompt, prefix)
    if allowed is None:
        return None
    return [tok.eos_token_id if c == deque.EOS else tok.convert_tokens_to_ids(c) for c in allowed]


def _alt_label(prompt, prefix, token):
    from topd_ds.tasks import deque_alt
    return deque_alt.label(prompt, prefix, token)


def _char(tok, tid):
    from topd_ds.tasks import deque
    return deque.EOS if tid == tok.eos_token_id else tok.convert_ids_to_tokens(int(tid))


# ------------------------------------------------------------------------------------------- analysis


def detectors(records: list[dict]) -> list[str]:
    """Score names, distances first (flag the smallest), then the baselines (flag the largest), then the
    checker's (flag the smallest)."""
    names = list(records[0]["scores"]) if records else []
    return ([n for n in names if n.startswith("d_")] + [n for n in names if n in BASELINES]
            + [n for n in names if n == STUDENT_INVALID])


def analyse(batches: list[list[dict]], q: float) -> dict:
    """Per detector: flags round(q M) candidates of every batch (as training does), then precision / recall
    over the labelled candidates of all batches."""
    names = detectors([r for recs in batches for r in recs])
    flags = {n: [] for n in names}
    labels = []
    for recs in batches:
        if not recs:
            continue
        count = int(round(q * len(recs)))
        for n in names:
            s = torch.tensor([r["scores"][n] for r in recs], dtype=torch.float64)
            s = -s if low_is_benign(n) else s
            flags[n].append(flag_top(torch.where(s.isnan(), -math.inf, s), count).numpy())  # no score: last
        # deque_alt's two benign kinds count as benign here (filter_labelled tells them apart)
        labels.extend("benign" if is_benign(r["label"]) else r["label"] for r in recs)
    labels = np.array(labels, dtype=object)
    keep = labels != None  # noqa: E711 (object array)
    kinds = ("benign", "error", "teacher") + (("forced",) if "forced" in labels else ())  # forced: deque_alt
    out = {"n_candidates": int(len(labels)), "n_labelled": int(keep.sum()), "q": q,
           "shares": {k: float((labels[keep] == k).mean()) for k in kinds}, "detectors": {}}
    for n in names:
        f = np.concatenate(flags[n]) if flags[n] else np.zeros(0, dtype=bool)
        out["detectors"][n] = precision_recall(f[keep], labels[keep].astype(str))
    # chance: a random q share has the base rate as precision and q as recall (in expectation)
    out["detectors"]["chance"] = {"flagged": None, "precision": out["shares"]["benign"], "recall": q,
                                  "precision_valid": 1 - out["shares"]["error"], "recall_valid": q, "errors_flagged": q}
    return out


def markdown(result: dict) -> str:
    lines = [f"{result['n_labelled']} labelled of {result['n_candidates']} high-loss candidates: "
             + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["shares"].items())
             + f"; each detector flags round({result['q']} x M) per batch.", "",
             "| detector | benign: precision | benign: recall | valid: precision | valid: recall | errors flagged |",
             "|---|---|---|---|---|---|"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for n, d in result["detectors"].items():
        lines.append(f"| {n} | {pct(d['precision'])} | {pct(d['recall'])} | {pct(d['precision_valid'])} | "
                     f"{pct(d['recall_valid'])} | {pct(d['errors_flagged'])} |")
    return "\n".join(lines)


def load_student(path: str):
    """The rollout policy as a local float32 model (the built-in tasks' students are small): the checker-based
    detector needs its whole next-token distribution, which the server's sampled logprob does not give. At the
    paper's 4B student this would be 16 GB of float32 on the study's host: like every study (session.with_mode), a
    tool for small models."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.windows) < 1:
        raise ConfigError(f"--windows: expected lengths >= 1, got {args.windows}")
    cfg = load_study_config(args)
    if cfg.opd.estimator != "full":
        raise ConfigError("opd.estimator: the filter study needs `full` (teacher hidden states at the candidates)")
    cfg = dataclasses.replace(cfg, topd=dataclasses.replace(cfg.topd, window=max(args.windows)))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    batches = []
    student = load_student(cfg.model.student)
    with open_session(cfg) as session:
        for step in range(args.batches):
            batches.append(study_batch(session, session.batch(step), sorted(set(args.windows)), generator,
                                       task=args.task, student=student))
            print(f"filter-study: batch {step + 1}/{args.batches}: {sum(map(len, batches))} candidates "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    result = analyse(batches, cfg.topd.false_alarm_quantile)
    # issue 25: within the labelled set, a chance reference per detector, AUROC with bootstrap intervals
    result["labelled"] = analyse_labelled(batches, cfg.topd.false_alarm_quantile, seed=cfg.train.seed)
    result.update(batches=args.batches, windows=args.windows, wall_s=time.perf_counter() - t0, config=args.config,
                  overrides=args.overrides)
    write_json_atomic(os.path.join(args.out, "filter.json"), {**result, "candidates": batches})
    print(markdown(result))
    print("\n" + markdown_labelled(result["labelled"]))
    print(f"wrote {args.out}/filter.json ({result['wall_s']:.0f}s)")
    return 0
