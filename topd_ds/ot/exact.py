"""Exact (unregularised) optimal transport with scipy: the test oracle and a CPU fallback (`ot.solver: exact`).

    plan, distance = exact_ot(cost)                 # (n, m) or (B, n, m) -> plan of the same shape, (B,) or ()

D_OT = min_{gamma in Pi(a, b)} sum_ij gamma_ij C_ij, Pi(a, b) = {gamma >= 0, gamma 1 = a, gamma^T 1 = b}.

* n == m with uniform marginals: `scipy.optimize.linear_sum_assignment`; by Birkhoff-von Neumann an optimal
  plan is a permutation matrix divided by n, so this is exact (and fast: ~40 us for 50 x 50).
* anything else: `scipy.optimize.linprog(method="highs")` on the n*m variables (exact to HiGHS' tolerances).
Masked rows/columns carry no mass; marginals follow `resolve_marginals` (renormalised to sum 1).
A problem with no unmasked row or no unmasked column has the zero plan and distance 0.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment, linprog

from topd_ds.ot.sinkhorn import resolve_marginals


def _uniform(w: np.ndarray) -> bool:
    return bool(np.all(np.abs(w - w[0]) <= 1e-12 * max(abs(w[0]), 1e-300)))


def exact_ot_single(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """One problem in float64 numpy. cost (n, m); a (n,), b (m,) non-negative with equal sums. -> (plan, distance)."""
    n, m = cost.shape
    plan = np.zeros((n, m), dtype=np.float64)
    rows = np.flatnonzero(a > 0)
    cols = np.flatnonzero(b > 0)
    if rows.size == 0 or cols.size == 0:
        return plan, 0.0
    c = cost[np.ix_(rows, cols)]  # (n', m')
    ar, bc = a[rows], b[cols]
    if rows.size == cols.size and _uniform(ar) and _uniform(bc) and abs(ar[0] - bc[0]) <= 1e-12 * ar[0]:
        r, k = linear_sum_assignment(c)
        plan[rows[r], cols[k]] = ar[0]
        return plan, float(ar[0] * c[r, k].sum())
    n2, m2 = c.shape
    # Equality constraints: row sums (n2 rows), column sums (m2 rows); variables x = vec(gamma) row-major.
    a_eq = np.zeros((n2 + m2, n2 * m2))
    for i in range(n2):
        a_eq[i, i * m2 : (i + 1) * m2] = 1.0
    for j in range(m2):
        a_eq[n2 + j, j::m2] = 1.0
    # HiGHS's optimality tolerances are absolute (~1e-7): on costs of scale 1e-6 it stops far from the optimum.
    # The optimal plan is the same for (C - min C) / spread, so solve that and price the plan with C.
    spread = float(c.max() - c.min())
    c_lp = (c - c.min()) / spread if spread > 0 else np.zeros_like(c)
    res = linprog(c_lp.reshape(-1), A_eq=a_eq, b_eq=np.concatenate([ar, bc]), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"exact_ot: linprog failed on a {n2}x{m2} problem: {res.message}")
    g = np.clip(res.x.reshape(n2, m2), 0.0, None)
    plan[np.ix_(rows, cols)] = g
    return plan, float((g * c).sum())


def exact_ot(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact OT for one (n, m) or a batch of (B, n, m) costs, solved on the CPU in float64.

    Args:
        cost: (n, m) or (B, n, m) finite costs, any device / float dtype.
        a, b: (n,)/(m,) or (B, n)/(B, m) marginals; default uniform over unmasked positions.
        mask_a, mask_b: bool, True = real position; False positions carry no mass.
    Returns:
        plan with cost's shape, dtype and device; distance () or (B,) = sum_ij plan_ij C_ij.

    Example:
        >>> plan, d = exact_ot(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        >>> plan, float(d)
        (tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]]), 0.0)
    """
    single = cost.dim() == 2
    if single:
        cost = cost[None]
        a, b = (None if a is None else a[None]), (None if b is None else b[None])
        mask_a, mask_b = (None if mask_a is None else mask_a[None]), (None if mask_b is None else mask_b[None])
    if cost.dim() != 3:
        raise ValueError(f"cost: expected (n, m) or (B, n, m), got shape {tuple(cost.shape)}")
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("cost: must be finite")
    c64 = cost.detach().to("cpu", torch.float64)
    a64, b64 = resolve_marginals(c64, a, b, mask_a=mask_a, mask_b=mask_b)
    c_np, a_np, b_np = c64.numpy(), a64.numpy(), b64.numpy()
    plans = np.zeros_like(c_np)
    dist = np.zeros(c_np.shape[0])
    for k in range(c_np.shape[0]):
        plans[k], dist[k] = exact_ot_single(c_np[k], a_np[k], b_np[k])
    plan_t = torch.from_numpy(plans).to(device=cost.device, dtype=cost.dtype)
    dist_t = torch.from_numpy(dist).to(device=cost.device, dtype=cost.dtype)
    return (plan_t[0], dist_t[0]) if single else (plan_t, dist_t)
