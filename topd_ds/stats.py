"""Statistics for the replication tables and the filter study (issue 25): pure functions, float64.

    row_stats(x)              mean, SD (over seeds, n - 1), SE of the mean (SD / sqrt n)
    paired_difference(a, b)   mean of a_i - b_i over shared seeds, its SE, t, df and a 95% t interval
    seeds_for_power(sd, d)    seeds a paired two-sided t test needs to show a difference d at the given power
    auroc(scores, labels)     P(score of a positive > score of a negative), ties counted 1/2
    bootstrap_auroc(...)      percentile bootstrap interval of the AUROC (resampling candidates)

Which number is which matters: the old tables mixed SD and SE under one "+-"; every caller here names them.
"""

import math

import numpy as np
from scipy import stats as _st


def row_stats(values) -> dict:
    """{"n", "mean", "sd", "se"} of a row's per-seed values (SD with n - 1; SD = SE = 0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("row_stats: no values")
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"n": int(x.size), "mean": float(x.mean()), "sd": sd, "se": sd / math.sqrt(x.size)}


def paired_difference(a, b, *, level: float = 0.95) -> dict:
    """Paired mean difference a - b over the same seeds (same seed = same prompts and rollout seeds).

    d_i = a_i - b_i, mean d, SE = SD(d) / sqrt(n), t = mean / SE, df = n - 1 and the interval
    mean +- t_{(1 + level) / 2, df} SE (Student's t). With n < 2 or SD(d) = 0, t and the interval are nan /
    degenerate: reported, not hidden. Example: a = [70, 72, 75], b = [68, 71, 70] -> d = [2, 1, 5],
    mean 8/3, SE sqrt(13)/3, t = 8 / sqrt(13) = 2.219, 95% interval 8/3 +- 4.303 sqrt(13)/3 = [-2.50, 7.84]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference: needs two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    d = a - b
    r = row_stats(d)
    n, mean, se = r["n"], r["mean"], r["se"]
    df = n - 1
    t = mean / se if se > 0 else (math.nan if mean == 0 or n < 2 else math.copysign(math.inf, mean))
    half = float(_st.t.ppf((1 + level) / 2, df)) * se if df > 0 else math.nan
    p = float(2 * _st.t.sf(abs(t), df)) if df > 0 and math.isfinite(t) else math.nan
    return {"n": n, "mean": mean, "sd": r["sd"], "se": se, "t": t, "df": df, "p": p,
            "ci": (mean - half, mean + half), "level": level}


def seeds_for_power(sd: float, delta: float, *, power: float = 0.8, alpha: float = 0.05, max_n: int = 10_000) -> int:
    """Smallest n with power >= `power` for a two-sided paired t test of a true mean difference `delta` when the
    per-seed differences have SD `sd` (noncentral t, exact). E.g. sd 4.2, delta 3 -> 18 seeds."""
    if sd <= 0 or delta == 0:
        raise ValueError("seeds_for_power: needs sd > 0 and delta != 0")
    for n in range(2, max_n + 1):
        df = n - 1
        crit = _st.t.ppf(1 - alpha / 2, df)
        nc = abs(delta) / sd * math.sqrt(n)
        if _st.nct.sf(crit, df, nc) + _st.nct.cdf(-crit, df, nc) >= power:
            return n
    return max_n


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for `labels` (1 = positive): the Mann-Whitney probability that a
    random positive scores above a random negative, ties 1/2. nan without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    ranks = _st.rankdata(np.concatenate([pos, neg]))  # average ranks: ties count 1/2
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def bootstrap_auroc(scores, labels, *, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """{"auroc", "ci", "n_pos", "n_neg"}: the AUROC and a percentile bootstrap interval, `n_boot` resamples with
    replacement (generator seeded by `seed`; resamples without both classes skipped). `groups` (one id per item):
    resample whole groups (a cluster bootstrap), for items that are not independent (candidates of one rollout
    batch share prompts and weights); None resamples items."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        g = np.asarray(groups)
        members = [np.flatnonzero(g == u) for u in np.unique(g)]
    boots = []
    for _ in range(n_boot):
        if members is None:
            i = rng.integers(0, s.size, s.size)
        else:
            i = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        v = auroc(s[i], y[i])
        if not math.isnan(v):
            boots.append(v)
    lo, hi = (np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if boots else (math.nan, math.nan))
    return {"auroc": auroc(s, y), "ci": (float(lo), float(hi)), "n_pos": int(y.sum()), "n_neg": int((~y).sum())}
