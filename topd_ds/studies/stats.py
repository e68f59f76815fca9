"""Summary statistics of the paper's studies (Sec 2.1, Appendix A, Sec 5.2): pure functions on 1-D arrays.

    pearson(x, y)            r = cov(x, y) / (sd(x) sd(y))
    spearman(x, y)           Pearson of the average ranks (ties share the mean of their ranks)
    low_divergence_fraction  share of high-loss D_OT at or below the upper quartile of low-loss D_OT
    binned_means             mean of y in equal-count bins of x (the trend line of Fig 6)
"""

import numpy as np


def _pair(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D arrays of one length, got {x.shape} and {y.shape}")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation; nan when fewer than 2 points or either side is constant."""
    x, y = _pair(x, y)
    if len(x) < 2:
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
