"""Merge identical cost rows (and columns) before Sinkhorn: exact for OT and for entropic OT.

    red = merge_duplicates(c_n, a, b)          # None when no problem of the batch has a duplicate
    plan_r, ... = solve(red.cost, red.a, red.b)  # (B, n', m'), n' <= n, m' <= m
    plan = expand_plan(plan_r, red, a, b)      # (B, n, m)

Token windows repeat tokens (Zipf: 50-token windows over a 200-token vocabulary hold ~27 distinct tokens), and
two positions holding the same token have identical cost rows. Rows i, i' with C_i. = C_i'. can be merged into one
row of mass a_i + a_i':
  * exact OT: any plan of the merged problem splits back into a plan of the original at the same cost, and any
    original plan merges into one of the same cost, so the optima are equal;
  * entropic OT: the optimum has P_ij = exp((f_i + g_j - C_ij)/eps), so rows with equal C_i. are proportional,
    P_i. = a_i q for a common q; merging adds sum_i a_i log(a_i / a_I) (a constant) to the entropy. Hence the
    merged solution P~_IJ expands exactly to P_ij = P~_IJ (a_i / a~_I) (b_j / b~_J), i in I, j in J,
    with potentials f_i = f~_I + eps log(a_i / a~_I), g_j = g~_J + eps log(b_j / b~_J).
Sinkhorn's iterates on the original problem are the merged iterates expanded the same way, so merging changes
neither the answer nor the iteration count, only the size of each iteration (~(27/50)^2 of the work on Zipf
windows). Masked rows (a_i = 0) are never merged and never occupy a slot: they expand to zero rows.

Duplicates are found by hashing each row (one mat-vec with a fixed random vector), grouping equal hashes by a
stable sort, and verifying every merge by exact equality with the group's first row, so a hash collision or a
rounding difference can only cost a missed merge, never a wrong one.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Merged:
    cost: torch.Tensor  # (B, n', m') normalised cost of the merged problems (row/column of each group's first member)
    a: torch.Tensor  # (B, n') merged row masses (0 on unused slots)
    b: torch.Tensor  # (B, m') merged column masses
    row_group: torch.Tensor  # (B, n) long: merged row of each original row (any slot for masked rows)
    col_group: torch.Tensor  # (B, m) long: merged column of each original column


def _hash_vector(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x70D5)
    return (0.5 + torch.rand(m, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)  # (m,)


def duplicate_groups(c: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Groups of identical rows of a contiguous c (B, n, m) among the rows where mask (B, n) is True.

    Returns group (B, n) long (merged slot of each row; masked rows get slot 0, or any slot: they carry no mass),
    first (B, n') long (original index of each slot's first member, 0 on unused slots) and n' = the largest
    number of groups in one problem (at least 1).
    """
    B, n, m = c.shape
    pos = torch.arange(n, device=c.device).expand(B, n)  # (B, n)
    h = torch.matmul(c, _hash_vector(m, c.dtype, c.device))  # (B, n) row hash; equal rows -> equal hash in practice
    sh, perm = torch.sort(h, dim=1, stable=True)  # stable: the first of a run of equal hashes has the lowest index
    new_run = torch.ones_like(sh, dtype=torch.bool)
    new_run[:, 1:] = sh[:, 1:] != sh[:, :-1]
    start = torch.where(new_run, pos, 0).cummax(dim=1).values  # (B, n) sorted position where each run starts
    rep = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, start))  # (B, n) original index of the run's first
    cand = (rep != pos) & mask & mask.gather(1, rep)  # (B, n) rows proposed for merging into an earlier row
    bi, ii = cand.nonzero(as_tuple=True)  # (k,), (k,)
    # Verify exactly: |C_i. - C_rep(i).|_1 == 0 iff the rows are equal (a difference of distinct finite floats is
    # never 0, and a sum of non-negative terms is 0 only if each is). Only the k candidates are compared.
    rows = c.reshape(B * n, m)  # c is contiguous (the caller transposes with a copy)
    same = (rows.index_select(0, bi * n + ii) - rows.index_select(0, bi * n + rep[bi, ii])).abs_().sum(-1) == 0  # (k,)
    ok = torch.zeros_like(cand).index_put_((bi, ii), same)
    rep = torch.where(ok, rep, pos)  # failed or masked: the row is its own group
    is_first = (rep == pos) & mask  # (B, n) rows that open a group
    slot = is_first.long().cumsum(1) - 1  # (B, n) slot of each first member
    group = slot.gather(1, rep).clamp_min(0)  # (B, n)
    n_r = max(1, int(is_first.sum(1).max())) if B > 0 else 1
    first = torch.zeros(B, n_r + 1, dtype=torch.long, device=c.device)
    first.scatter_(1, torch.where(is_first, slot, n_r), pos)  # non-first rows write into the spare column n_r
    return group, first[:, :n_r], n_r


def merge_duplicates(
    c_n: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, min_gain: float = 0.9
) -> Merged | None:
    """Merge identical rows and columns of c_n (B, n, m) with marginals a (B, n), b (B, m) (zero = masked).

    Returns None when the merged problem would keep more than min_gain of the n * m entries (too little to gain),
    and for an empty batch or a side of 1 (nothing to merge).
    """
    B, n, m = c_n.shape
    if B == 0 or n < 2 or m < 2:
        return None
    mask_a, mask_b = a > 0, b > 0
    row_group, row_first, n_r = duplicate_groups(c_n, mask_a)
    col_group, col_first, m_r = duplicate_groups(c_n.transpose(1, 2).contiguous(), mask_b)
    if n_r * m_r > min_gain * n * m:
        return None
    a_r = torch.zeros(B, n_r, dtype=a.dtype, device=a.device).scatter_add_(1, row_group, a)  # (B, n')
    b_r = torch.zeros(B, m_r, dtype=b.dtype, device=b.device).scatter_add_(1, col_group, b)  # (B, m')
    flat = (row_first[:, :, None] * m + col_first[:, None, :]).reshape(B, n_r * m_r)  # (B, n' m') entry of C~
    cost = c_n.reshape(B, n * m).gather(1, flat).reshape(B, n_r, m_r)  # (B, n', m')
    return Merged(cost, a_r, b_r, row_group, col_group)


def split_weights(w: torch.Tensor, w_r: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Share of each original position in its merged slot: w_i / w~_group(i) (0 on masked positions). (B, n)"""
    tot = w_r.gather(1, group)  # (B, n)
    return torch.where(w > 0, w / tot.clamp_min(torch.finfo(w.dtype).tiny), 0.0)


def expand_plan(plan_r: torch.Tensor, red: Merged, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P_ij = P~_{group(i) group(j)} (a_i / a~_group(i)) (b_j / b~_group(j)). (B, n', m') -> (B, n, m)"""
    B, _, m_r = plan_r.shape
    n, m = a.shape[1], b.shape[1]
    wa = split_weights(a, red.a, red.row_group)  # (B, n)
    wb = split_weights(b, red.b, red.col_group)  # (B, m)
    plan = plan_r.gather(1, red.row_group[:, :, None].expand(B, n, m_r))  # (B, n, m')
    plan = plan.gather(2, red.col_group[:, None, :].expand(B, n, m))  # (B, n, m)
    return plan.mul_(wa[:, :, None]).mul_(wb[:, None, :])


def expand_potential(f_r: torch.Tensor, w: torch.Tensor, w_r: torch.Tensor, group: torch.Tensor, eps: torch.Tensor):
    """f_i = f~_group(i) + eps log(w_i / w~_group(i)) on real positions, 0 on masked ones. (B, n') -> (B, n)

    eps: (B, 1) regularisation in the potentials' units.
    """
    share = split_weights(w, w_r, group)  # (B, n)
    f = f_r.gather(1, group) + eps * torch.log(share.clamp_min(torch.finfo(w.dtype).tiny))
    return torch.where(w > 0, f, 0.0)


def expand_solution(plan_r, f_r, g_r, red: Merged | None, a, b, *, eps: float):
    """Plan (B, n', m') and potentials (B, n'), (B, m') of a merged problem -> those of the original problem
    (B, n, m), (B, n), (B, m); returned unchanged when nothing was merged (red is None). eps in the potentials'
    units."""
    if red is None:
        return plan_r, f_r, g_r
    e = torch.full_like(f_r[:, :1], eps)  # (B, 1)
    f = expand_potential(f_r, a, red.a, red.row_group, e)  # (B, n)
    g = expand_potential(g_r, b, red.b, red.col_group, e)  # (B, m)
    return expand_plan(plan_r, red, a, b), f, g
