"""Candidate selection, false-alarm labelling and median capping (paper Sec 2.1, 3, 5.1).

Pure tensor functions, no autograd needed except `cap_at_median`, which keeps the gradient.

* select_candidates: per sequence, the m highest-loss response positions (paper: m ~ 218 of
  N ~ 9688 tokens, fraction ~ 0.0225), or the lowest / random ones as the study's controls.
* label_false_alarms: given the candidates' short-window OT distances D_OT, mark the false alarms
  (high loss, low divergence): bottom-q of D_OT (paper Sec 5.1: q = 0.3), an absolute threshold, or
  the low-divergence range calibrated on low-loss probes (paper Sec 2.1: the upper quartile of the
  low-loss positions' D_OT).
* matched_high_ot: Table 2's control, the same number of candidates drawn at random from the high-OT
  region.
* cap_at_median: the marked tokens' loss capped at the sample's median token loss (paper Sec 5.1).
"""

from __future__ import annotations

import math

import torch

from topd_ds.errors import ConfigError

SELECT_MODES = ("high", "low", "random")
LABEL_METHODS = ("quantile", "threshold", "low_loss_range")


def _bool(mask: torch.Tensor, shape, name: str = "mask") -> torch.Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _counts(n_valid: torch.Tensor, fraction: float | None, count: int | None) -> torch.Tensor:
    """Per-sequence number of candidates: round(fraction * n), >= 1 when fraction > 0 and n > 0; <= n."""
    if (fraction is None) == (count is None):
        raise ConfigError("fraction: give exactly one of fraction or count")
    if count is not None:
        if count < 0:
            raise ConfigError(f"count: must be >= 0, got {count}")
        k = torch.full_like(n_valid, count)
    else:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"fraction: must be in [0, 1], got {fraction}")
        k = torch.floor(n_valid.double() * fraction + 0.5).long()  # round half up
        if fraction > 0:
            k = k.clamp_min(1)
    return torch.minimum(k, n_valid)  # (B,)


def select_candidates(token_loss: torch.Tensor, mask: torch.Tensor, *, fraction: float | None = None,
                      count: int | None = None, mode: str = "high", generator: torch.Generator | None = None,
                      min_distance: int | None = None) -> torch.Tensor:
    """Per-sequence candidate positions as a (B, T) bool mask (never a masked position).

    token_loss (B, T) (any per-token OPD loss; only its order matters), mask (B, T).
    Per sequence with n unmasked tokens, k = count, or round(fraction * n) with at least 1 when
    fraction > 0 and n > 0; k <= n. mode "high": the k largest losses (paper's high-loss candidates);
    "low": the k smallest (low-loss probes); "random": k uniform positions (random probes, drawn with
    `generator`). Ties go to the earlier position. min_distance d: greedy in priority order, skip a
    position closer than d to one already taken (probing windows overlap less); may then give < k.
    """
    if mode not in SELECT_MODES:
        raise ConfigError(f"mode: expected one of {SELECT_MODES}, got {mode!r}")
    valid = _bool(mask, token_loss.shape)
    B, T = token_loss.shape
    k = _counts(valid.sum(1), fraction, count)  # (B,)
    if mode == "random":
        key = torch.rand(B, T, generator=generator, dtype=torch.float64).to(token_loss.device)
    else:
        key = token_loss.detach().double() * (1.0 if mode == "high" else -1.0)
    # Priority order: valid positions first, then by key descending, then by position (stable sorts).
    order = key.argsort(dim=1, descending=True, stable=True)  # (B, T)
    order = order.gather(1, (~valid).gather(1, order).to(torch.int8).argsort(dim=1, stable=True))
    if min_distance is None or min_distance <= 1:
        take_sorted = torch.arange(T, device=token_loss.device)[None, :] < k[:, None]  # (B, T) in priority order
        return torch.zeros_like(valid).scatter(1, order, take_sorted)
    out = torch.zeros_like(valid)
    for b in range(B):  # greedy spacing: O(T * k) per sequence, fine for m ~ 200
        taken: list[int] = []
        for p in order[b, : int(valid[b].sum())].tolist():
            if len(taken) == int(k[b]):
                break
            if all(abs(p - q) >= min_distance for q in taken):
                taken.append(p)
        out[b, taken] = True
    return out


def candidate_indices(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> (batch_idx (M,), pos (M,)) int64, ordered by sequence then position."""
    return candidates.nonzero(as_tuple=True)


def _bottom_q(d_ot: torch.Tensor, q: float) -> torch.Tensor:
    """The round(q * M) smallest entries (ties to the earlier index) as a bool (M,)."""
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"q: must be in [0, 1], got {q}")
    n = math.floor(q * d_ot.numel() + 0.5)
    out = torch.zeros(d_ot.shape, dtype=torch.bool, device=d_ot.device)
    out[d_ot.argsort(stable=True)[:n]] = True
    return out


def _check_d_ot(d_ot: torch.Tensor, name: str = "d_ot") -> None:
    if d_ot.dim() != 1:
        raise ValueError(f"{name}: expected shape (M,), got {tuple(d_ot.shape)}")
    if not bool(torch.isfinite(d_ot).all()):
        raise ValueError(f"{name}: contains nan or inf")


def label_false_alarms(d_ot: torch.Tensor, *, method: str = "quantile", q: float = 0.3,
                       threshold: float | None = None, low_loss_d_ot: torch.Tensor | None = None) -> torch.Tensor:
    """Mark false alarms among high-loss candidates from their OT distances: (M,) -> bool (M,).

    quantile:       the round(q * M) candidates with the smallest D_OT (paper Sec 5.1: q = 0.3). The
                    scope (one sequence, one batch) is the caller's: pass the candidates to rank together.
    threshold:      D_OT <= threshold.
    low_loss_range: D_OT <= Q3 of low_loss_d_ot, the upper quartile of the low-loss probes' D_OT
                    (paper Sec 2.1's low-divergence range; 29.23% of high-loss tokens fell in it).
                    Q3 uses linear interpolation (torch.quantile / numpy default).
    The rest of the candidates are real divergent points.
    """
    _check_d_ot(d_ot)
    if method == "quantile":
        return _bottom_q(d_ot, q)
    if method == "threshold":
        if threshold is None:
            raise ConfigError("threshold: required for method='threshold'")
        return d_ot <= threshold
    if method == "low_loss_range":
        if low_loss_d_ot is None or low_loss_d_ot.numel() == 0:
            raise ConfigError("low_loss_d_ot: required (non-empty) for method='low_loss_range'")
        _check_d_ot(low_loss_d_ot, "low_loss_d_ot")
        upper = torch.quantile(low_loss_d_ot.double(), 0.75)
        return d_ot.double() <= upper
    raise ConfigError(f"method: expected one of {LABEL_METHODS}, got {method!r}")


def matched_high_ot(d_ot: torch.Tensor, n_marked: int, *, q: float = 0.3,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Table 2's control: n_marked candidates drawn uniformly from the high-OT region. (M,) -> bool (M,).

    High-OT region = the candidates NOT in the bottom-q set of label_false_alarms(method="quantile"),
    so with n_marked = that set's size the two interventions touch the same number of tokens.
    """
    _check_d_ot(d_ot)
    high = (~_bottom_q(d_ot, q)).nonzero(as_tuple=True)[0]  # (H,)
    if not 0 <= n_marked <= high.numel():
        raise ConfigError(f"n_marked: must be in [0, {high.numel()}] (size of the high-OT region), got {n_marked}")
    pick = high[torch.randperm(high.numel(), generator=generator).to(high.device)[:n_marked]]
    out = torch.zeros(d_ot.shape, dtype=torch.bool, device=d_ot.device)
    out[pick] = True
    return out


def sequence_median(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Median of each sequence's unmasked token losses, (B, T) -> (B,); the mean of the two middle
    values for an even count (numpy's definition); 0 for a sequence with no tokens. Detached."""
    valid = _bool(mask, token_loss.shape)
    x = torch.where(valid, token_loss.detach(), math.inf).sort(1).values  # (B, T), valid first
    n = valid.sum(1)  # (B,)
    lo = ((n - 1).clamp_min(0) // 2)[:, None]
    hi = (n // 2).clamp_max(token_loss.shape[1] - 1)[:, None]
    med = (x.gather(1, lo) + x.gather(1, hi)).squeeze(1) / 2
    return torch.where(n > 0, med, 0.0)


def median_cap_scale(token_loss: torch.Tensor, mask: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Detached (B, T) factor: clamp(median_b / loss, 0, 1) at marked tokens whose loss exceeds the
    median of their sequence, 1 elsewhere. Also usable on a policy-gradient per-token loss."""
    valid = _bool(mask, token_loss.shape)
    mk = _bool(marked, token_loss.shape, "marked") & valid
    loss = token_loss.detach()
    med = sequence_median(loss, valid)[:, None]  # (B, 1)
    over = mk & (loss > med)
    ratio = (med / torch.where(over, loss, 1.0)).clamp(0.0, 1.0)  # loss > med >= ... so loss > 0 unless med < 0
    return torch.where(over, ratio, 1.0)


def cap_at_median(token_loss: torch.Tensor, mask: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """Marked tokens' loss capped at the sample's median token loss (paper Sec 5.1). (B, T) -> (B, T).

    Returned as token_loss * scale with scale = min(1, median / loss) DETACHED (see median_cap_scale):
    a capped token's value equals the median and it keeps a gradient in the same direction, scaled by
    median / loss, rather than none (a hard clamp) or the full one (value-only straight-through).
    If the median is negative (sampled-token estimates can be), the scale is clamped at 0: the token
    is dropped instead of having its gradient flipped. Masked positions come back as 0.
    """
    valid = _bool(mask, token_loss.shape)
    scale = median_cap_scale(token_loss, valid, marked)  # (B, T), detached
    capped = torch.where(torch.isinf(token_loss) & (scale < 1), sequence_median(token_loss, valid)[:, None],
                         token_loss * scale)  # an infinite loss would give inf * 0 = nan: use the median
    return torch.where(valid, capped, 0.0)
