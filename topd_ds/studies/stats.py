"""Statistics of the studies and the replication tables: pure functions on 1-D arrays, float64.

    pearson(x, y)            r = cov(x, y) / (sd(x) sd(y))
    spearman(x, y)           Pearson of the average ranks (ties share the mean of their ranks)
    low_divergence_fraction  share of high-loss D_OT at or below the upper quartile of low-loss D_OT
    binned_means             mean of y in equal-count bins of x (the trend line of Fig 6)
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


def _pair(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation; nan when fewer than 2 points or either side is constant."""
    x, y = _pair(x, y)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # tested exactly: a constant's mean may be 1 ulp off it
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x, y) -> float:
    x, y = _pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


def summary(values) -> dict:
    """n, mean, median and quartiles of a sample (nan when empty)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "median": nan, "q25": nan, "q75": nan}
    q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(med), "q25": float(q25), "q75": float(q75)}


def low_divergence_fraction(high_d_ot, low_d_ot) -> tuple[float, float]:
    """(fraction of high-loss D_OT <= the upper quartile of low-loss D_OT, that quartile): paper Sec 2.1's
    "high-loss tokens inside the typical low-divergence range" (29.23% there)."""
    high, low = np.asarray(high_d_ot, np.float64), np.asarray(low_d_ot, np.float64)
    if high.size == 0 or low.size == 0:
        return float("nan"), float("nan")
    upper = float(np.quantile(low, 0.75))
    return float((high <= upper).mean()), upper


def binned_means(x, y, *, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean x, mean y) per bin of about equal count along sorted x; empty bins are dropped."""
    x, y = _pair(x, y)
    order = np.argsort(x, kind="mergesort")
    parts = [p for p in np.array_split(order, min(bins, len(x))) if len(p)] if len(x) else []
    return np.array([x[p].mean() for p in parts]), np.array([y[p].mean() for p in parts])


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
