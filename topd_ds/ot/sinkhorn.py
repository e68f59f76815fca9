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

Algorithm of the torch path (chosen for the trainer's shape: ~218 problems of 50 x 50 per trajectory):
  * duplicate merging (`dedup.py`): identical cost rows (repeated tokens) are merged into one row carrying
    their summed mass, likewise columns; exact for OT and entropic OT, the plan is expanded back at the end;
  * epsilon scaling: stages eps_k = max(eps, eps_scaling^k), each warm-started from the last potentials;
  * inside a stage, kernel-domain (exp-space) matrix-vector Sinkhorn u = a / K v, v = b / K^T u with
    K = exp((f + g - C~) / eps_k), so an iteration is two batched mat-vecs, no exp and no logsumexp;
    over-relaxed (u <- max(u + w (a / K v - u), a / (2 K v)), w = `omega`; cf. Thibault et al. 2017), with w
    dropped to 1 for a problem whose marginal error grows between two checks;
  * the scalings are absorbed into the log-domain potentials (f += eps log u, g += eps log v; Schmitzer 2016,
    "stabilised scaling") at the end of each stage and whenever they leave [1e-30, 1e30]; if an iterate turns
    non-finite anyway, the stage is redone in the log domain (logsumexp updates, w = 1), which cannot underflow;
  * the L1 marginal error |P 1 - a|_1 + |P^T 1 - b|_1 comes free with the updates and is checked every
    `check_every` iterations; problems that meet `tol` leave the active set, so the slow ones do not make the
    whole batch iterate;
  * the final plan is rounded onto Pi(a, b) (Altschuler, Weed & Rigollet 2017, Alg. 2), so its marginals are
    exact to float precision; `info.marginal_err` is the error of the Sinkhorn iterate before rounding.
CPU speed notes (2-core EPYC, one thread): exp() of float32 inputs below about -87 takes a slow path (~8x), so
kernel exponents are clamped at -80 (float64: -700) and the clamped entries set to 0 (float32 underflows there anyway);
full-size boolean `torch.where` costs ~30x a multiply, so masks enter as a huge cost on padded entries instead.
`sinkhorn_fixed` runs a static number of log-domain iterations with no host sync (CUDA-graph safe).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from topd_ds.errors import ConfigError
from topd_ds.ot.dedup import expand_plan, expand_potential, merge_duplicates
from topd_ds.ot.stages import MASK_COST, kernel, kernel_stage, kernel_stage_cpu, log_stage, marginal_error

BACKENDS = ("auto", "torch", "triton")
TRITON_MAX_SIDE = 128  # the fused kernel holds the whole padded n x m block on chip


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


def _solver_cost(c_n: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, sync_free: bool = False) -> torch.Tensor:
    """C~ with MASK_COST on entries of zero-mass rows/columns, so their kernel entries are exactly 0. (B, n, m)"""
    ma, mb = a > 0, b > 0
    if not sync_free and bool(ma.all()) and bool(mb.all()):
        return c_n
    invalid = 1.0 - ma.to(c_n.dtype)[:, :, None] * mb.to(c_n.dtype)[:, None, :]  # (B, n, m)
    return invalid.mul_(MASK_COST).add_(c_n)


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


def _solve(c_k, a, b, schedule, *, max_iter, tol, stage_tol, check_every, omega):
    """Tolerance-driven eps stages on the solver cost c_k (B, n, m). -> f, g (normalised units), iters, err, backend"""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    n_iter, used, err = 0, "torch", torch.zeros_like(a[:, 0])
    tiny = torch.finfo(a.dtype).tiny
    log_a = torch.where(a > 0, torch.log(a.clamp_min(tiny)), 0.0)  # (B, n)
    log_b = torch.where(b > 0, torch.log(b.clamp_min(tiny)), 0.0)  # (B, m)
    for k, e_k in enumerate(schedule):
        t = tol if k == len(schedule) - 1 else max(tol, stage_tol)
        if k > 0:  # warm start: keep f - eps log a, not f (P = a b^T exp((f~ + g~ - C)/eps) varies smoothly in eps;
            # with non-uniform a, e.g. merged duplicates, f alone starts the next stage off by (eps' - eps) log a)
            f = f + (e_k - schedule[k - 1]) * log_a
            g = g + (e_k - schedule[k - 1]) * log_b
        stage = kernel_stage_cpu if c_k.device.type == "cpu" and not c_k.requires_grad else kernel_stage
        f1, g1, it, err, ok = stage(c_k, a, b, f, g, e_k, max_iter, check_every, t, omega)
        if not ok:  # an exp-space iterate under/overflowed: redo this stage in the log domain, unrelaxed
            f1, g1, it, err = log_stage(c_k, a, b, f, g, e_k, max_iter, check_every=check_every, tol=t)
            used = "torch-log"
        f, g, n_iter = f1, g1, n_iter + it
    return f, g, n_iter, err, used


def _result(cost, c_k, a, b, f, g, eps_last, cmin, spread, *, round_plan, n_iter, err, backend, merged=None):
    """Plan from the potentials (normalised units), rounding, expansion of merged duplicates, SinkhornInfo."""
    plan = kernel(c_k, f, g, eps_last)  # (B, n', m'); 0 on padded entries
    if merged is not None:
        if round_plan:
            plan = round_to_marginals(plan, merged.a, merged.b)
        e = torch.full_like(spread[:, None], eps_last)  # (B, 1)
        f = expand_potential(f, a, merged.a, merged.row_group, e)  # (B, n)
        g = expand_potential(g, b, merged.b, merged.col_group, e)  # (B, m)
        plan = expand_plan(plan, merged, a, b)  # (B, n, m)
    elif round_plan:
        plan = round_to_marginals(plan, a, b)
    distance = (plan * cost).sum(dim=(1, 2))  # (B,) plan is exactly 0 on padded entries
    s = spread[:, None]
    info = SinkhornInfo(
        distance=distance,
        f=torch.where(a > 0, f * s + cmin[:, None], 0.0),
        g=torch.where(b > 0, g * s, 0.0),
        n_iter=int(n_iter),
        marginal_err=err,
        eps_abs=eps_last * spread,
        backend=backend,
    )
    return plan, info


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
    per = _split_iters(iters, len(schedule)) if isinstance(iters, int) else list(iters)
    if len(per) != len(schedule):
        raise ConfigError(f"ot.iters: expected {len(schedule)} per-stage counts (schedule {schedule}), got {len(per)}")
    c_n, cmin, spread = normalise_cost(cost, a > 0, b > 0, sync_free=True)
    c_k = _solver_cost(c_n, a, b, sync_free=True)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for e_k, it_k in zip(schedule, per):
        f, g, _, _ = log_stage(c_k, a, b, f, g, e_k, it_k, omega=omega)
    err = marginal_error(kernel(c_k, f, g, schedule[-1]), a, b)
    return _result(cost, c_k, a, b, f, g, schedule[-1], cmin, spread, round_plan=round_plan, n_iter=sum(per),
                   err=err, backend="torch-log")


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
            the stages, no early stop, omega 1) or "auto" (triton on CUDA when n, m <= 128, torch otherwise).
    Returns:
        plan (B, n, m) in cost's dtype, zero on masked rows/columns; SinkhornInfo.

    Example:
        >>> plan, info = sinkhorn(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), eps=1e-3)
        >>> plan.round(decimals=4), info.distance.round(decimals=4)
        (tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]]), tensor([0.]))
    """
    if backend not in BACKENDS:
        raise ConfigError(f"ot.backend: expected one of {BACKENDS}, got {backend!r}")
    if cost.dim() != 3:
        raise ValueError(f"cost: expected (B, n, m), got shape {tuple(cost.shape)}")
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
    B, n, m = cost.shape
    a, b = resolve_marginals(cost, a, b, mask_a=mask_a, mask_b=mask_b)  # (B, n), (B, m); zero = padding
    schedule = eps_schedule(eps, eps_scaling)

    use_triton = backend == "triton" or (
        backend == "auto" and cost.is_cuda and n <= TRITON_MAX_SIDE and m <= TRITON_MAX_SIDE and B > 0
    )
    if fixed_iter is not None and not use_triton:
        return sinkhorn_fixed(cost, a, b, eps=eps, iters=fixed_iter, eps_scaling=eps_scaling, round_plan=round_plan)
    c_n, cmin, spread = normalise_cost(cost, a > 0, b > 0)
    if use_triton:
        from topd_ds.ot.triton_sinkhorn import sinkhorn_triton  # lazy: CPU users never import triton

        # No early stop inside the kernel: fixed_iter (default: max_iter) split over the stages as on the torch path.
        per = _split_iters(fixed_iter if fixed_iter is not None else max_iter, len(schedule))
        f, g, n_iter, err = sinkhorn_triton(c_n, a, b, schedule=schedule, iters=per)
        return _result(cost, _solver_cost(c_n, a, b), a, b, f, g, schedule[-1], cmin, spread, round_plan=round_plan,
                       n_iter=n_iter, err=err, backend="triton")
    merged = merge_duplicates(c_n, a, b) if dedup and B > 0 and n > 1 and m > 1 else None
    c_r, a_r, b_r = (c_n, a, b) if merged is None else (merged.cost, merged.a, merged.b)
    c_k = _solver_cost(c_r, a_r, b_r)
    f, g, n_iter, err, used = _solve(c_k, a_r, b_r, schedule, max_iter=max_iter, tol=tol, stage_tol=stage_tol,
                                     check_every=check_every, omega=omega)
    return _result(cost, c_k, a, b, f, g, schedule[-1], cmin, spread, round_plan=round_plan, n_iter=n_iter,
                   err=err, backend=used, merged=merged)


def _split_iters(total: int, stages: int) -> list[int]:
    """Static iteration split for fixed iterations: half the budget to the final stage, the rest spread evenly."""
    if stages == 1:
        return [total]
    head = total // 2 // (stages - 1)
    return [head] * (stages - 1) + [total - head * (stages - 1)]
