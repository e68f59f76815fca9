"""The studies' figures (matplotlib, Agg backend: files only, no display needed).

Each function takes plain arrays and a path, writes one PNG (temp name, then rename) and returns the figure
so the caller can also log it to TensorBoard.
"""

import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return fig


def distributions(groups: dict, path: str, *, title: str, xlabel: str = "short-window OT distance"):
    """Histograms (shared bins) and box plots of named samples, medians in the legend."""
    plt = _pyplot()
    fig, (ax_hist, ax_box) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    groups = {name: np.asarray(v, dtype=float) for name, v in groups.items()}
    values = list(groups.values())
    pooled = np.concatenate([v for v in values if v.size]) if any(v.size for v in values) else np.zeros(1)
    bins = np.linspace(pooled.min(), pooled.max() + 1e-9, 31)
    for (name, v), color in zip(groups.items(), ("tab:red", "tab:blue", "tab:green", "tab:orange")):
        if v.size:
            ax_hist.hist(v, bins=bins, density=True, histtype="step", linewidth=2, color=color,
                         label=f"{name} (n={v.size}, median {np.median(v):.3f})")
            ax_hist.axvline(np.median(v), color=color, linestyle="--", linewidth=1)
    ax_hist.set_xlabel(xlabel)
    ax_hist.set_ylabel("density")
    ax_hist.legend(fontsize=8)
    ax_box.boxplot([v if v.size else [np.nan] for v in values], showfliers=False)
    ax_box.set_xticks(range(1, len(values) + 1), list(groups))
    ax_box.set_ylabel(xlabel)
    fig.suptitle(title)
    return _save(fig, path)


def scatter_with_trend(x, y, bin_x, bin_y, path: str, *, title: str, xlabel: str, ylabel: str):
    """Points of (x, y) and the binned-mean line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(x, y, s=8, alpha=0.35, color="tab:blue", label="high-loss positions")
    ax.plot(bin_x, bin_y, "-o", color="tab:red", linewidth=2, markersize=4, label="binned mean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
