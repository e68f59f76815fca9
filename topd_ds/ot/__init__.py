"""Optimal transport between teacher and student token windows (paper Sec 3).

    table = cost_table(embedding, device)                           # unit rows on the trainer's device
    cost = token_cost(table, teacher_ids, student_ids)              # (B, n, m) where the table lives
    res = ot_distance(cost, mask_a=teacher_mask, mask_b=student_mask)
    res.distance  # (B,) D_OT;  res.plan  # (B, n, m) soft alignments (rows: teacher, columns: student)
"""

from dataclasses import dataclass

import torch

from topd_ds.errors import ConfigError
from topd_ds.ot.cost import cost_table, token_cost
from topd_ds.ot.exact import exact_ot
from topd_ds.ot.sinkhorn import ConvergenceWarning, SinkhornInfo, sinkhorn, sinkhorn_fixed

SOLVERS = ("sinkhorn", "exact")


@dataclass(frozen=True)
class OTResult:
    plan: torch.Tensor  # (B, n, m) transport plan, zero on masked rows/columns
    distance: torch.Tensor  # (B,) <plan, C>
    n_iter: int  # Sinkhorn iterations (0 for the exact solver)
    marginal_err: torch.Tensor  # (B,) L1 marginal error before rounding (0 for the exact solver)
    backend: str  # the stage solver that ran: "triton", "torch", "torch-log" (SinkhornInfo.backend) or "exact"


def ot_distance(
    cost: torch.Tensor,
    *,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    solver: str = "sinkhorn",
    **opts,
) -> OTResult:
    """D_OT = min_{gamma in Pi(a, b)} <gamma, C> for a batch (B, n, m), uniform marginals over unmasked positions.

    solver "sinkhorn": entropic plan from `sinkhorn(cost, ..., **opts)` (eps relative to the cost spread), on
    cost's device (the fused Triton kernel for a CUDA cost, `choose_backend`);
    solver "exact": scipy on the CPU (`exact_ot`), results moved back to cost's device.
    """
    if solver == "sinkhorn":
        plan, info = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, **opts)
        return OTResult(plan, info.distance, info.n_iter, info.marginal_err, info.backend)
    if solver == "exact":
        if opts:
            raise ConfigError(f"ot.solver: options {sorted(opts)} do not apply to the exact solver")
        plan, dist = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
        return OTResult(plan, dist, 0, torch.zeros_like(dist), "exact")
    raise ConfigError(f"ot.solver: expected one of {SOLVERS}, got {solver!r}")


__all__ = ["ConvergenceWarning", "OTResult", "SinkhornInfo", "cost_table", "exact_ot", "ot_distance", "sinkhorn", "sinkhorn_fixed", "token_cost"]
