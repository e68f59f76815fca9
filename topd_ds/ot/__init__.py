"""Short-window optimal transport between teacher and student token windows (paper Sec 3).

    cost = token_cost(embedding, teacher_ids, student_ids)          # (B, K, K), rows = teacher positions
    res = ot_distance(cost, mask_a=teacher_mask, mask_b=student_mask)  # res.plan (B, K, K), res.distance (B,)

`ot_distance` is the one entry the trainer calls; `sinkhorn` and `exact_ot` are the solvers behind it.
"""

from dataclasses import dataclass

import torch

from topd_ds.ot.cost import token_cost
from topd_ds.ot.exact import exact_ot
from topd_ds.ot.sinkhorn import sinkhorn

SOLVERS = ("sinkhorn", "exact")


@dataclass(frozen=True)
class OTResult:
    plan: torch.Tensor          # (B, n, m) transport plan, rows = teacher positions
    distance: torch.Tensor      # (B,) <plan, C>
    n_iter: int                 # Sinkhorn iterations (0 for exact)
    marginal_err: torch.Tensor  # (B,) L1 marginal error before rounding (0 for exact)


def ot_distance(cost, *, mask_a=None, mask_b=None, solver: str = "sinkhorn", **opts) -> OTResult:
    """D_OT and plan for a batch of costs with uniform marginals over unmasked positions.

    solver="sinkhorn": entropic OT (opts: eps, max_iter, tol, ...; Triton kernel on CUDA);
    solver="exact": scipy (assignment / HiGHS) on the CPU, results moved back to the cost's device."""
    if solver == "sinkhorn":
        plan, info = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, **opts)
        return OTResult(plan, info.distance, info.n_iter, info.marginal_err)
    if solver == "exact":
        plan, distance = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
        zeros = torch.zeros(cost.shape[0], dtype=cost.dtype, device=cost.device)
        return OTResult(plan.to(cost.device), distance.to(cost.device), 0, zeros)
    raise ValueError(f"ot.solver: must be one of {SOLVERS}, got {solver!r}")


__all__ = ["OTResult", "exact_ot", "ot_distance", "sinkhorn", "token_cost"]
