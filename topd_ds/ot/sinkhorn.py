"""Batched entropic OT (Sinkhorn) for many small problems: torch on CPU/GPU, fused Triton kernel on CUDA.

    plan, info = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=0.05)   # cost (B, n, m)
    info.distance  # (B,) = sum_ij plan_ij C_ij
    plan, info = sinkhorn_fixed(cost, a, b, eps=0.05, iters=300)         # no host sync: CUDA-graph capturable

Problem (Cuturi 2013; Peyre & Cuturi 2019, Sec 4):
    min_{P in Pi(a, b)} <P, C> - eps_abs H(P),   Pi(a, b) = {P >= 0, P 1 = a, P^T 1 = b}
with solution P_ij = exp((f_i + g_j - C_ij) / eps_abs) for dual potentials f (B, n), g (B, m).

eps convention: `eps` is RELATIVE to each problem's cost spread s = max C - min C over its unmasked entries,
eps_abs = eps * s. OT plans do not change when a constant is added to C, and scale with C, so the spread is
the scale that matters (a relative eps on 1 - cos costs of random 2560-d vectors, all within 1 +- 0.07, would
otherwise give a uniform plan). Internally the cost is normalised to C~ = (C - min C) / s in [0, 1].
All-equal costs (s = 0) have the closed-form solution P = a b^T.

Every solve takes one path (`solve`), each step once and in order, like POT's `sinkhorn_log`:
  1. normalise (`normalise_cost`): C~ = (C - min C) / s on unmasked entries;
  2. merge duplicates (`dedup.merge_duplicates`, tolerance path only): identical cost rows (repeated tokens)
     become one row carrying their summed mass, likewise columns; exact for OT and entropic OT;
  3. mask (`stages.solver_cost`): padded entries get a huge cost, so their kernel entries are exactly 0;
  4. eps stages on the chosen backend (`choose_backend`, `stages.STAGE_SOLVERS`): eps_k = max(eps, eps_scaling^k),
     each warm-started from the last potentials, on one of
       "torch"     tolerance-driven kernel-domain iterations (numpy on the CPU), over-relaxed, absorbed into
                   log-domain potentials, an active set, a log-domain redo of a stage whose iterate overflows;
       "torch-log" a static number of log-domain iterations, no host sync (`sinkhorn_fixed`, CUDA graphs);
       "triton"    the fused CUDA kernel, all stages in one launch, fixed iterations (`triton_sinkhorn.py`);
  5. plan and round: P = exp((f + g - C~) / eps), projected onto Pi(a, b) (Altschuler, Weed & Rigollet 2017,
     Alg. 2), so its marginals are exact to float precision; `info.marginal_err` is the error before rounding;
  6. expand merged duplicates back (`dedup.expand_solution`), price <P, C>, potentials in the cost's units.
docs/OT.md says why each step is there and what it measured.
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from topd_ds.errors import ConfigError
from topd_ds.ot.dedup import expand_solution, merge_duplicates
from topd_ds.ot.stages import STAGE_SOLVERS, kernel, solver_cost

BACKENDS = ("auto", "torch", "triton")
TRITON_MAX_SIDE = 128  # = triton_sinkhorn.MAX_SIDE (the kernel holds the padded block on chip); not imported
# from there, so that CPU users never import triton


@dataclass(frozen=True)
class SinkhornInfo:
    """Diagnostics of one batched solve. Potentials are in the cost's units: P_ij = exp((f_i+g_j-C_ij)/eps_abs)."""

    distance: torch.Tensor  # (B,) <plan, C> of the returned (rounded) plan
    f: torch.Tensor  # (B, n) dual potential of the rows (0 on masked rows)
    g: torch.Tensor  # (B, m) dual potential of the columns (0 on masked columns)
    n_iter: int  # Sinkhorn iterations run (all stages; the slowest problem's count)
    marginal_err: torch.Tensor  # (B,) L1 marginal error (rows + columns) of the last iterate, before rounding
    eps_abs: torch.Tensor  # (B,) absolute regularisation used: eps * cost spread
    backend: str  # "torch", "torch-log" (log-domain fallback or fixed iterations) or "triton"


def resolve_marginals(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginals (B, n), (B, m) in cost's dtype: zero on masked positions, each summing to 1.

    Default a, b are uniform over unmasked positions. A problem with no mass on one side gets zero on both
    sides (an empty problem: zero plan, distance 0).
    """
    B, n, m = cost.shape
    opts = dict(dtype=cost.dtype, device=cost.device)
    a = torch.ones(B, n, **opts) if a is None else a.to(**opts).expand(B, n).clone()
    b = torch.ones(B, m, **opts) if b is None else b.to(**opts).expand(B, m).clone()
    if bool((a < 0).any()) or bool((b < 0).any()) or not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError("a, b: marginals must be finite and non-negative")
    if mask_a is not None:
        a = a * mask_a.to(cost.device).expand(B, n)
    if mask_b is not None:
        b = b * mask_b.to(cost.device).expand(B, m)
    sa, sb = a.sum(-1, keepdim=True), b.sum(-1, keepdim=True)  # (B, 1)
    live = (sa > 0) & (sb > 0)
    a = torch.where(live, a / sa.clamp_min(torch.finfo(cost.dtype).tiny), 0.0)
    b = torch.where(live, b / sb.clamp_min(torch.finfo(cost.dtype).tiny), 0.0)
    return a, b


def normalise_cost(
    cost: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor, *, sync_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C~ = (C - min C) / s on valid entries (0 elsewhere), s = max C - min C over valid entries (1 where s == 0).

    cost (B, n, m); mask_a (B, n), mask_b (B, m) bool. -> C~ (B, n, m), min (B,), s (B,).
    sync_free: skip the host-side "no padding" shortcut (CUDA-graph capture).
    """
    B = cost.shape[0]
    if not sync_free and bool(mask_a.all()) and bool(mask_b.all()):  # the common case: no padding, no mask arithmetic
        cmin, cmax = cost.amin(dim=(1, 2)), cost.amax(dim=(1, 2))  # (B,)
        spread = cmax - cmin
        spread = torch.where(spread > 0, spread, 1.0)  # flat problems: any scale works, P = a b^T
        return (cost - cmin[:, None, None]) / spread[:, None, None], cmin, spread
    validf = mask_a.to(cost.dtype)[:, :, None] * mask_b.to(cost.dtype)[:, None, :]  # (B, n, m) 1 = valid
    big = torch.finfo(cost.dtype).max / 4
    off = (1.0 - validf).mul_(big)  # (B, n, m) pushes invalid entries out of the min / max
    cmin = (cost + off).amin(dim=(1, 2))  # (B,)
    cmax = (cost - off).amax(dim=(1, 2))
    any_valid = (mask_a.any(1) & mask_b.any(1)).reshape(B)
    cmin = torch.where(any_valid, cmin, 0.0)
    spread = torch.where(any_valid, cmax - cmin, 0.0)
    spread = torch.where(spread > 0, spread, 1.0)
    c_n = ((cost - cmin[:, None, None]) / spread[:, None, None]).mul_(validf)
    return c_n, cmin, spread


def round_to_marginals(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Project a non-negative plan onto Pi(a, b) (Altschuler, Weed & Rigollet 2017, Alg. 2). (B,n,m) -> (B,n,m).

    X = diag(min(a / P1, 1)) P;  Y = X diag(min(b / X^T 1, 1));  P' = Y + e_a e_b^T / |e_a|_1,
    e_a = a - Y 1, e_b = b - Y^T 1. Changes P by at most 2 (|P1 - a|_1 + |P^T 1 - b|_1) in L1.
    """
    tiny = torch.finfo(plan.dtype).tiny
    row = plan.sum(-1)  # (B, n)
    plan = plan * torch.where(row > a, a / row.clamp_min(tiny), 1.0)[:, :, None]
    col = plan.sum(-2)  # (B, m)
    plan = plan * torch.where(col > b, b / col.clamp_min(tiny), 1.0)[:, None, :]
    err_a = (a - plan.sum(-1)).clamp_min(0.0)  # (B, n)
    err_b = (b - plan.sum(-2)).clamp_min(0.0)  # (B, m)
    norm = err_a.sum(-1).clamp_min(tiny)[:, None, None]  # (B, 1, 1)
    return plan + err_a[:, :, None] * err_b[:, None, :] / norm


def eps_schedule(eps: float, eps_scaling: float | None) -> list[float]:
    """Relative eps of each stage: 1, r, r^2, ... down to eps (just [eps] without scaling)."""
    if eps_scaling is None or eps >= 1.0:
        return [eps]
    stages = max(1, math.ceil(math.log(eps) / math.log(eps_scaling) - 1e-9))
    return [max(eps, eps_scaling**k) for k in range(stages)] + [eps]


def choose_backend(requested: str, device: torch.device, n: int, m: int, *, fixed_iter: int | None = None) -> str:
    """The stage solver a solve runs on: "triton" (fused kernel, fixed iterations), "torch" (tolerance-driven,
    kernel domain) or "torch-log" (fixed iterations, log domain: sync-free).

    "auto" takes the Triton kernel on CUDA when the problem fits its block (n, m <= TRITON_MAX_SIDE), so the
    trainer's windows (K = 50) solve in one launch wherever the cost lives on a GPU.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"ot.backend: expected one of {BACKENDS}, got {requested!r}")
    fits = n <= TRITON_MAX_SIDE and m <= TRITON_MAX_SIDE
    if requested == "triton" and not fits:
        raise ValueError(f"cost: backend 'triton' takes n, m <= {TRITON_MAX_SIDE}, got ({n}, {m})")
    if requested == "triton" or (requested == "auto" and torch.device(device).type == "cuda" and fits):
        return "triton"
    return "torch" if fixed_iter is None else "torch-log"


def sinkhorn_fixed(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float = 0.05,
    iters: int | Sequence[int] = 300,
    eps_scaling: float | None = 0.2,
    omega: float = 1.0,
    round_plan: bool = True,
) -> tuple[torch.Tensor, SinkhornInfo]:
    """Fixed-iteration log-domain Sinkhorn with no host sync and no data-dependent control flow: CUDA-graph safe.

    Same problem, eps convention and result as `sinkhorn`, but the caller supplies a, b already resolved
    (`resolve_marginals`: non-negative, zero on padding, each summing to 1 or all zero) and nothing is validated.
    Runs iters[k] iterations at the k-th eps stage of `eps_schedule(eps, eps_scaling)` (an int total is split
    half to the last stage, the rest evenly), each f <- (1 - omega) f + omega f_sinkhorn, likewise g.

    Args:
        cost: (B, n, m) finite float32/float64. a: (B, n), b: (B, m) marginals.
    Returns:
        plan (B, n, m), SinkhornInfo (n_iter = total iterations, backend "torch-log").

    Example:
        >>> cost = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> plan, info = sinkhorn_fixed(cost, torch.full((1, 2), 0.5), torch.full((1, 2), 0.5), eps=1e-3, iters=50)
        >>> plan.round(decimals=4)
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]])
    """
    schedule = eps_schedule(eps, eps_scaling)
    per = split_iters(iters, len(schedule)) if isinstance(iters, int) else list(iters)
    if len(per) != len(schedule):
        raise ConfigError(f"ot.iters: expected {len(schedule)} per-stage counts (schedule {schedule}), got {len(per)}")
    return solve(cost, a, b, schedule, backend="torch-log", stage_opts=dict(iters=per, omega=omega), dedup=False,
                 round_plan=round_plan, sync_free=True)


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    mask_a: torch.Tensor | None = None,
    mask_b: torch.Tensor | None = None,
    eps: float = 0.05,
    max_iter: int = 2000,
    tol: float = 1e-3,
    check_every: int = 10,
    fixed_iter: int | None = None,
    eps_scaling: float | None = 0.2,
    stage_tol: float = 1e-2,
    omega: float = 1.8,
    dedup: bool = True,
    round_plan: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, SinkhornInfo]:
    """Entropic OT plans for a batch of costs: argmin_{P in Pi(a,b)} <P, C> - eps_abs H(P), eps_abs = eps * spread(C).

    Args:
        cost: (B, n, m) finite float32/float64 costs (rows: teacher positions, columns: student positions).
        a, b: (B, n), (B, m) (or (n,), (m,)) non-negative marginals; default uniform over unmasked positions.
            Both are renormalised to sum 1.
        mask_a, mask_b: (B, n), (B, m) bool, True = real position; False positions get no mass.
        eps: regularisation relative to each problem's cost spread (max - min over unmasked entries).
            Relative error of <P, C> vs exact OT is ~1e-4..1e-3 at eps = 1e-3 on 50 x 50 token costs.
        max_iter: cap on the iterations of each eps stage.
        tol: stop when the L1 marginal error |P 1 - a|_1 + |P^T 1 - b|_1 < tol.
        check_every: iterations between error checks (each is a host sync).
        fixed_iter: run exactly this many log-domain iterations through `sinkhorn_fixed` (CUDA-graph capture once
            the inputs are validated); tol, max_iter, check_every and dedup are then unused.
        eps_scaling: ratio between successive eps stages starting at 1 (None: a single stage at eps).
        stage_tol: tolerance of the intermediate eps stages (only the last stage is held to `tol`).
        omega: over-relaxation of the scaling updates, in [1, 2); 1 is plain Sinkhorn. Tolerance path only
            (it needs the error checks to fall back to 1 where it oscillates); fixed iterations and Triton use 1.
        dedup: merge identical cost rows / columns first (exact; see dedup.py). Torch tolerance path only.
        round_plan: project the final plan onto Pi(a, b) so its marginals are exact.
        backend: "torch", "triton" (n, m <= 128; fused kernel, fixed iterations: fixed_iter or max_iter split over
            the stages, no early stop, omega 1) or "auto" (`choose_backend`: triton on CUDA when n, m <= 128).
    Returns:
        plan (B, n, m) in cost's dtype, zero on masked rows/columns; SinkhornInfo.

    Example:
        >>> plan, info = sinkhorn(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), eps=1e-3)
        >>> plan.round(decimals=4), info.distance.round(decimals=4)
        (tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]]), tensor([0.]))
    """
    if cost.dim() != 3:
        raise ValueError(f"cost: expected (B, n, m), got shape {tuple(cost.shape)}")
    B, n, m = cost.shape
    chosen = choose_backend(backend, cost.device, n, m, fixed_iter=fixed_iter)
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cost: expected float32 or float64, got {cost.dtype}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"ot.eps: expected a finite value > 0, got {eps}")
    if eps_scaling is not None and not 0 < eps_scaling < 1:
        raise ConfigError(f"ot.eps_scaling: expected a ratio in (0, 1) or None, got {eps_scaling}")
    if not 1.0 <= omega < 2.0:
        raise ConfigError(f"ot.omega: expected an over-relaxation in [1, 2), got {omega}")
    # amin / amax propagate NaN and show +-inf: two reductions instead of a full-size isfinite (~15x slower here).
    if cost.numel() and not (math.isfinite(float(cost.detach().amin())) and math.isfinite(float(cost.detach().amax()))):
        raise ValueError("cost: must be finite")
    a, b = resolve_marginals(cost, a, b, mask_a=mask_a, mask_b=mask_b)  # (B, n), (B, m); zero = padding
    schedule = eps_schedule(eps, eps_scaling)
    if chosen == "torch":
        opts = dict(max_iter=max_iter, tol=tol, stage_tol=stage_tol, check_every=check_every, omega=omega)
    else:  # fixed iterations (no early stop): fixed_iter, or max_iter for the kernel, split over the stages
        opts = dict(iters=split_iters(fixed_iter if fixed_iter is not None else max_iter, len(schedule)))
    plan, info = solve(cost, a, b, schedule, backend=chosen, stage_opts=opts, dedup=dedup and chosen == "torch",
                       round_plan=round_plan)
    if chosen == "torch" and fixed_iter is None and bool((info.marginal_err > tol).any()):
        # As POT does: a plan short of `tol` is still returned (rounded onto the marginals), but said so once.
        warnings.warn(f"sinkhorn: the marginal error stayed above tol={tol:g} after max_iter={max_iter} iterations "
                      f"in some problems (info.marginal_err); raise ot.max_iter or ot.eps", ConvergenceWarning)
    return plan, info


class ConvergenceWarning(UserWarning):
    """Sinkhorn stopped at max_iter with the marginal error above tol."""


def solve(cost, a, b, schedule, *, backend, stage_opts, dedup, round_plan, sync_free=False):
    """The one path of every solve, each step once and in order (cf. POT's `sinkhorn_log`):
    normalise -> merge duplicates -> mask -> eps stages on the backend -> plan and round -> expand -> price.

    cost (B, n, m); a (B, n), b (B, m) resolved marginals (zero = padding); schedule: relative eps per stage;
    backend: a key of `stages.STAGE_SOLVERS`, stage_opts its options. sync_free: no host sync anywhere
    (dedup must be off), for CUDA-graph capture. Allocates O(B n m) working memory, a few copies.
    -> plan (B, n, m), SinkhornInfo.
    """
    c_n, cmin, spread = normalise_cost(cost, a > 0, b > 0, sync_free=sync_free)  # (B, n, m) in [0, 1]
    merged = merge_duplicates(c_n, a, b) if dedup else None  # (B, n', m') problems, or None
    c_r, a_r, b_r = (c_n, a, b) if merged is None else (merged.cost, merged.a, merged.b)
    c_k = solver_cost(c_r, a_r, b_r, sync_free=sync_free)  # MASK_COST on padded entries
    f, g, n_iter, err, used = STAGE_SOLVERS[backend](c_k, a_r, b_r, schedule, **stage_opts)
    plan = kernel(c_k, f, g, schedule[-1])  # (B, n', m'); 0 on padded entries
    if round_plan:
        plan = round_to_marginals(plan, a_r, b_r)
    plan, f, g = expand_solution(plan, f, g, merged, a, b, eps=schedule[-1])  # (B, n, m), (B, n), (B, m)
    s = spread[:, None]
    info = SinkhornInfo(
        distance=(plan * cost).sum(dim=(1, 2)),  # (B,) the plan is exactly 0 on padded entries
        f=torch.where(a > 0, f * s + cmin[:, None], 0.0),
        g=torch.where(b > 0, g * s, 0.0),
        n_iter=int(n_iter),
        marginal_err=err,
        eps_abs=schedule[-1] * spread,
        backend=used,
    )
    return plan, info


def split_iters(total: int, stages: int) -> list[int]:
    """Static iteration split for fixed iterations: half the budget to the final stage, the rest spread evenly."""
    if stages == 1:
        return [total]
    head = total // 2 // (stages - 1)
    return [head] * (stages - 1) + [total - head * (stages - 1)]
