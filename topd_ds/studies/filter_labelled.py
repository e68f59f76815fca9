"""The filter study's analysis within the labelled set (issue 25): benign vs error, per detector.

`filter_study.analyse` flags round(q M) of ALL candidates per batch, many of them unlabelled (after an error), so
each detector's share of the labelled set differed and one "chance" row was the wrong reference for most. Here:

* only candidates labelled benign (any "benign*" label: deque's `benign`, deque_alt's `benign_reconverging` /
  `benign_diverging`) or `error` count; the others (the teacher's own token, forced tokens, no label) are left out;
* every detector flags round(q n_b) of the n_b such candidates of each batch (the same budget for all), and gets
  its own chance reference: a random flag set of its size has precision = the benign base rate of the set and
  recall = its flagged share;
* AUROC of benign vs error for every score (oriented: distances low = benign, baselines high = benign) with a
  percentile bootstrap interval that resamples whole batches (candidates of one batch share prompts and rollouts,
  so they are not independent; topd_ds.studies.stats.bootstrap_auroc), overall and per benign kind.

    analyse_labelled(batches, q) -> {"n", "counts", "q", "detectors": {name: {...}}}
"""

import math

import numpy as np

from topd_ds.studies.stats import bootstrap_auroc

ERROR = "error"
STUDENT_INVALID = "student_invalid_mass"  # the checker-based detector (filter_study)


def is_benign(label) -> bool:
    return isinstance(label, str) and label.startswith("benign")


def low_is_benign(name: str) -> bool:
    """Scores flagged when SMALL: the distances (d_*) and the student's mass on invalid tokens."""
    return name.startswith("d_") or name == STUDENT_INVALID


def oriented(name: str, value: float) -> float:
    """A detector's score with higher = more likely benign."""
    return -value if low_is_benign(name) else value


def _flag_top(scores: np.ndarray, count: int) -> np.ndarray:
    """(n,) bool: the `count` highest (stable: ties by position), as filter_study.flag_top."""
    out = np.zeros(scores.size, dtype=bool)
    if count > 0:
        out[np.argsort(-scores, kind="stable")[:count]] = True
    return out


def analyse_labelled(batches: list, q: float, *, names=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """batches: lists of filter-study records ({"label", "scores": {name: value}}). Returns per detector:
    flagged, precision (benign share of the flagged), recall (share of the benign flagged), errors_flagged,
    chance_precision / chance_recall (a random set of the same size from the same candidates), and auroc with
    its bootstrap ci, overall ("auroc") and per benign kind ("auroc_by_kind")."""
    names = names or sorted({n for recs in batches for r in recs for n in r["scores"]})
    kept = [[r for r in recs if is_benign(r["label"]) or r["label"] == ERROR] for recs in batches]
    labels = np.array([r["label"] for recs in kept for r in recs], dtype=object)
    batch_of = np.array([b for b, recs in enumerate(kept) for _ in recs])  # the bootstrap resamples whole batches
    benign = np.array([is_benign(x) for x in labels], dtype=bool)
    n = int(labels.size)
    kinds = sorted({x for x in labels if is_benign(x)})
    out = {"n": n, "q": q, "counts": {k: int((labels == k).sum()) for k in kinds + [ERROR]}, "detectors": {}}
    for name in names:
        scores = np.array([oriented(name, r["scores"].get(name, math.nan)) for recs in kept for r in recs])
        flags = np.concatenate([_flag_top(np.array([oriented(name, r["scores"].get(name, math.nan)) for r in recs]),
                                          int(round(q * len(recs)))) for recs in kept if recs] or [np.zeros(0, bool)])
        nf = int(flags.sum())
        ratio = lambda a, b: float(a.sum() / b.sum()) if b.any() else math.nan  # noqa: E731
        d = {"flagged": nf, "precision": ratio(flags & benign, flags), "recall": ratio(flags & benign, benign),
             "errors_flagged": ratio(flags & ~benign, ~benign),
             "chance_precision": float(benign.mean()) if n else math.nan,
             "chance_recall": nf / n if n else math.nan}
        ok = ~np.isnan(scores)
        d.update(bootstrap_auroc(scores[ok], benign[ok], groups=batch_of[ok], n_boot=n_boot, seed=seed))
        d["auroc_by_kind"] = {}
        for k in kinds:
            sel = ok & ((labels == k) | ~benign)
            d["auroc_by_kind"][k] = bootstrap_auroc(scores[sel], (labels == k)[sel], groups=batch_of[sel],
                                                    n_boot=n_boot, seed=seed)
        out["detectors"][name] = d
    return out


def markdown_labelled(result: dict) -> str:
    """The table, each column named: precision and recall of flagging benign candidates, each with its chance
    reference, errors flagged, and AUROC [95% bootstrap interval] for benign vs error."""
    pct = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"  # noqa: E731
    head = (f"{result['n']} labelled candidates (" + ", ".join(f"{k} {v}" for k, v in result["counts"].items())
            + f"); each detector flags round({result['q']} x n) of each batch's labelled candidates")
    lines = [head, "", "| detector | flagged | benign precision (chance) | benign recall (chance) | errors flagged | "
             "AUROC benign vs error [95% bootstrap] |", "|---|---|---|---|---|---|"]
    for name, d in result["detectors"].items():
        lines.append(f"| {name} | {d['flagged']} | {pct(d['precision'])} ({pct(d['chance_precision'])}) | "
                     f"{pct(d['recall'])} ({pct(d['chance_recall'])}) | {pct(d['errors_flagged'])} | "
                     f"{d['auroc']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] |")
    return "\n".join(lines)


def compact(study: dict) -> dict:
    """A filter.json made small enough to commit (docs/records/): everything but the per-candidate records, plus the
    labelled benign / error candidates' batch, label, token and scores (all the labelled analysis needs)."""
    out = {k: v for k, v in study.items() if k != "candidates"}
    out["labelled_candidates"] = [
        {"batch": b, "label": r["label"], "token": r["token"], "teacher_argmax": r["teacher_argmax"],
         "scores": {k: round(v, 6) for k, v in r["scores"].items()}}
        for b, recs in enumerate(study.get("candidates", [])) for r in recs
        if is_benign(r["label"]) or r["label"] == ERROR]
    return out
