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

import numpy as np
import torch
import torch.nn.functional as F

from topd_ds.errors import ConfigError
from topd_ds.ot.dedup import expand_plan, expand_potential, merge_duplicates

BACKENDS = ("auto", "torch", "triton")
TRITON_MAX_SIDE = 128  # the fused kernel holds the whole padded n x m block on chip
_ABSORB_HI = 1e30  # absorb the scalings into the potentials when they leave [1/_ABSORB_HI, _ABSORB_HI]
# Kernel exponents are clamped at the floor (exp() of inputs whose result would be subnormal takes a slow path,
# ~8x) and clamped entries are then set to exactly 0 (the threshold is just above exp(floor)).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
_K_FLOOR = {torch.float32: 2e-35, torch.float64: 1e-304}  # exp(-80) = 1.8e-35, exp(-700) = 9.9e-305
_MASK_COST = 1e30  # normalised cost given to padded entries inside the solver: their kernel entries are 0


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
    """C~ with _MASK_COST on entries of zero-mass rows/columns, so their kernel entries are exactly 0. (B, n, m)"""
    ma, mb = a > 0, b > 0
    if not sync_free and bool(ma.all()) and bool(mb.all()):
        return c_n
    invalid = 1.0 - ma.to(c_n.dtype)[:, :, None] * mb.to(c_n.dtype)[:, None, :]  # (B, n, m)
    return invalid.mul_(_MASK_COST).add_(c_n)


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


def _mv(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched mat-vec K v: (B, n, m) @ (B, m) -> (B, n). On CPU through numpy's matmul: torch's batched gemv on
    CPU measured ~10x slower here (600 us vs 60 us for 218 x 50 x 50 float32, one thread)."""
    if K.device.type == "cpu" and not K.requires_grad:
        return torch.from_numpy(K.numpy() @ v.numpy()[:, :, None])[:, :, 0]
    return torch.bmm(K, v[:, :, None])[:, :, 0]


def _vm(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Batched K^T u: (B, n) @ (B, n, m) -> (B, m), without a transposed copy of K."""
    if K.device.type == "cpu" and not K.requires_grad:
        return torch.from_numpy(u.numpy()[:, None, :] @ K.numpy())[:, 0, :]
    return torch.bmm(u[:, None, :], K)[:, 0, :]


def _kernel(c_k: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """K = exp((f_i + g_j - C~_ij) / eps), 0 where the exponent is below _EXP_FLOOR (padded entries too). (B, n, m)"""
    z = torch.sub(f[:, :, None], c_k).add_(g[:, None, :]).mul_(1.0 / eps)  # (B, n, m)
    return F.threshold_(z.clamp_(min=_EXP_FLOOR[z.dtype]).exp_(), _K_FLOOR[z.dtype], 0.0)


def _relax(x: torch.Tensor, x_new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Over-relaxed scaling update max(x + w (x_new - x), x_new / 2). (B, k); w (B, 1).

    Successive over-relaxation on the scalings (a linear step, not the geometric x^(1-w) x_new^w of Thibault et al.
    2017: same fixed point, and it costs two elementwise ops instead of two logs and an exp, which matters when
    an iteration is two small mat-vecs). The floor x_new / 2 keeps it positive; padded positions stay 0.
    """
    return torch.maximum(x + w * (x_new - x), 0.5 * x_new)


def _lse(z: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over dim with the shifted exponents clamped at _EXP_FLOOR (exp's slow path); -inf rows stay finite."""
    zmax = z.amax(dim, keepdim=True).clamp_min(-torch.finfo(z.dtype).max)
    return (zmax + torch.log((z - zmax).clamp_(min=_EXP_FLOOR[z.dtype]).exp_().sum(dim, keepdim=True))).squeeze(dim)


def _marginal_err(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 marginal error |K 1 - a|_1 + |K^T 1 - b|_1 of a plan K (B, n, m). -> (B,)"""
    return (K.sum(2) - a).abs().sum(1) + (K.sum(1) - b).abs().sum(1)


def _log_stage(c_k, a, b, f, g, eps, iters, *, check_every=0, tol=None, omega=1.0):
    """Log-domain Sinkhorn (logsumexp updates), over-relaxed by omega: cannot underflow.

    With check_every=0 there is no host sync (CUDA-graph safe). Returns f, g, iterations, marginal error (B,).
    """
    tiny = torch.finfo(c_k.dtype).tiny
    mask_a, mask_b = a > 0, b > 0
    eps_log_a = eps * torch.log(a.clamp_min(tiny))  # (B, n)
    eps_log_b = eps * torch.log(b.clamp_min(tiny))  # (B, m)
    err = torch.zeros_like(a[:, 0])
    it = 0
    while it < iters:
        f_new = eps_log_a - eps * _lse((g[:, None, :] - c_k) / eps, 2)  # (B, n)
        f = torch.where(mask_a, f_new if omega == 1.0 else f + omega * (f_new - f), 0.0)
        g_new = eps_log_b - eps * _lse((f[:, :, None] - c_k) / eps, 1)  # (B, m)
        g = torch.where(mask_b, g_new if omega == 1.0 else g + omega * (g_new - g), 0.0)
        it += 1
        if check_every and (it % check_every == 0 or it == iters):
            err = _marginal_err(_kernel(c_k, f, g, eps), a, b)
            if tol is not None and float(err.max()) < tol:
                break
    return f, g, it, err


def _kernel_stage(c_k, a, b, f, g, eps, max_iter, check_every, tol, omega):
    """Stabilised kernel-domain Sinkhorn at one eps, over-relaxed, with an active set of unconverged problems.

    Returns f, g (absorbed), iterations run, marginal L1 error (B,), ok (False if an iterate went non-finite:
    the caller then redoes the stage in the log domain).
    """
    tiny = torch.finfo(c_k.dtype).tiny
    B = c_k.shape[0]
    relax = omega != 1.0
    err = torch.zeros(B, dtype=c_k.dtype, device=c_k.device)
    idx = torch.arange(B, device=c_k.device)  # active problems
    K = _kernel(c_k, f, g, eps)  # (B, n, m)
    fa, ga, aa, ba = f, g, a, b
    ma, mb = (a > 0).to(a.dtype), (b > 0).to(b.dtype)  # (B, n), (B, m) 1 on real positions
    u, v = ma, mb  # scalings on top of the warm-start potentials
    w = torch.full((B, 1), omega, dtype=c_k.dtype, device=c_k.device)  # per-problem relaxation
    prev = torch.full((B,), math.inf, dtype=c_k.dtype, device=c_k.device)  # error at the previous check
    ktu = torch.zeros_like(b)
    it = 0
    while it < max_iter and idx.numel() > 0:
        kv = _mv(K, v)  # (b, n)
        if it > 0 and it % check_every == 0:
            e = (u * kv - aa).abs().sum(1)  # (b,) row error; the column error is 0 after an unrelaxed v update
            if relax:
                e = e + (v * ktu - ba).abs().sum(1)
                w = torch.where((e > prev)[:, None], 1.0, w)  # the error grew: plain Sinkhorn from now
                prev = e
            if not bool(torch.isfinite(e).all()):
                return f, g, it, err, False
            big = (u.amax(1) > _ABSORB_HI) | (v.amax(1) > _ABSORB_HI)
            big |= (torch.where(ma > 0, u, 1.0).amin(1) < 1 / _ABSORB_HI) | (torch.where(mb > 0, v, 1.0).amin(1) < 1 / _ABSORB_HI)
            done = e < tol
            absorb = done | big  # finished problems and those whose scalings drift out of range
            if bool(absorb.any()):
                lu = torch.where(ma > 0, eps * torch.log(u.clamp_min(tiny)), 0.0)
                lv = torch.where(mb > 0, eps * torch.log(v.clamp_min(tiny)), 0.0)
                fa = torch.where(absorb[:, None], fa + lu, fa)
                ga = torch.where(absorb[:, None], ga + lv, ga)
                f = f.index_copy(0, idx, fa)
                g = g.index_copy(0, idx, ga)
                err = err.index_copy(0, idx, e)
                keep = ~done
                sel = big & keep
                if bool(sel.any()):  # rebuild the kernels of the re-absorbed problems, restart their scalings
                    rows = sel.nonzero()[:, 0]
                    K[rows] = _kernel(c_k[idx[rows]], fa[rows], ga[rows], eps)
                    u = torch.where(sel[:, None], ma, u)
                    v = torch.where(sel[:, None], mb, v)
                    kv = _mv(K, v)
                if not bool(keep.all()):
                    idx, K, u, v, kv, ktu = idx[keep], K[keep], u[keep], v[keep], kv[keep], ktu[keep]
                    fa, ga, aa, ba, ma, mb = fa[keep], ga[keep], aa[keep], ba[keep], ma[keep], mb[keep]
                    w, prev = w[keep], prev[keep]
                    if idx.numel() == 0:
                        break
        u_new = aa / kv.clamp_min(tiny)  # padded rows: a = 0 -> u = 0
        u = _relax(u, u_new, w) if relax else u_new
        ktu = _vm(u, K)  # (b, m)
        v_new = ba / ktu.clamp_min(tiny)
        v = _relax(v, v_new, w) if relax else v_new
        it += 1
    if idx.numel() > 0:  # iteration cap reached: absorb what is left
        kv = _mv(K, v)
        e = (u * kv - aa).abs().sum(1) + (v * ktu - ba).abs().sum(1)
        if not bool(torch.isfinite(e).all()):
            return f, g, it, err, False
        fa = fa + torch.where(ma > 0, eps * torch.log(u.clamp_min(tiny)), 0.0)
        ga = ga + torch.where(mb > 0, eps * torch.log(v.clamp_min(tiny)), 0.0)
        f, g, err = f.index_copy(0, idx, fa), g.index_copy(0, idx, ga), err.index_copy(0, idx, e)
    return f, g, it, err, True


def _kernel_stage_cpu(c_k, a, b, f, g, eps, max_iter, check_every, tol, omega):
    """`_kernel_stage` in numpy, for CPU tensors: the same iteration with ~5x less overhead per iteration.

    On the CPU the time goes to the tail: a few slow problems iterating in a small active set, where torch's
    per-op dispatch (~5-10 us) outweighs the arithmetic. Converged problems are marked dead and dropped from the
    arrays only once a quarter of the batch is dead (each compaction copies K). Same returns as `_kernel_stage`.
    """
    K = _kernel(c_k, f, g, eps).numpy()  # (B, n, m), writable view
    dt = K.dtype
    tiny = np.finfo(dt).tiny
    B = K.shape[0]
    f_out, g_out = f.clone(), g.clone()
    fo, go = f_out.numpy(), g_out.numpy()  # (B, n), (B, m) results, written as problems finish
    err = np.zeros(B, dtype=dt)
    idx = np.arange(B)  # original index of each row of the working arrays
    fa, ga = fo.copy(), go.copy()
    aa, ba = a.numpy(), b.numpy()
    ma, mb = (aa > 0).astype(dt), (ba > 0).astype(dt)
    u, v = ma.copy(), mb.copy()
    w = np.full((B, 1), omega, dtype=dt)
    prev = np.full(B, np.inf, dtype=dt)
    live = np.ones(B, dtype=bool)
    ktu = np.zeros_like(v)
    relax = omega != 1.0

    def _relax_np(x, x_new):  # `_relax` in numpy
        return np.maximum(x + w * (x_new - x), 0.5 * x_new)

    def _absorb(rows, e):  # fold eps log u, eps log v of the given rows into fa, ga and the outputs
        fa[rows] += np.where(ma[rows] > 0, eps * np.log(np.maximum(u[rows], tiny)), 0.0)
        ga[rows] += np.where(mb[rows] > 0, eps * np.log(np.maximum(v[rows], tiny)), 0.0)
        fo[idx[rows]], go[idx[rows]], err[idx[rows]] = fa[rows], ga[rows], e[rows]

    it = 0
    with np.errstate(all="ignore"):  # dead rows may keep iterating into inf/nan: they are never read again
        while it < max_iter:
            kv = np.matmul(K, v[:, :, None])[:, :, 0]  # (b, n)
            if it > 0 and it % check_every == 0:
                e = np.abs(u * kv - aa).sum(1)  # (b,) row error; columns are exact after an unrelaxed v update
                if relax:
                    e += np.abs(v * ktu - ba).sum(1)
                    w[e > prev] = 1.0  # the error grew: diverging or oscillating, plain Sinkhorn from now
                    prev = e
                if not np.isfinite(e[live]).all():
                    return f, g, it, torch.from_numpy(err), False
                big = (u.max(1) > _ABSORB_HI) | (v.max(1) > _ABSORB_HI)
                big |= (np.where(ma > 0, u, 1.0).min(1) < 1 / _ABSORB_HI) | (np.where(mb > 0, v, 1.0).min(1) < 1 / _ABSORB_HI)
                done = (e < tol) & live
                big &= live & ~done
                if done.any() or big.any():
                    _absorb(done | big, e)
                    if big.any():  # rebuild the kernels of the re-absorbed problems, restart their scalings
                        rows = np.flatnonzero(big)
                        K[rows] = _kernel(c_k[torch.from_numpy(idx[rows])], torch.from_numpy(fa[rows]),
                                          torch.from_numpy(ga[rows]), eps).numpy()
                        u[rows], v[rows] = ma[rows], mb[rows]
                        kv[rows] = np.matmul(K[rows], v[rows][:, :, None])[:, :, 0]
                    live &= ~done
                    if not live.any():
                        break
                    if live.sum() <= 0.75 * live.size:  # compact: drop the dead rows
                        idx, K, u, v, kv, ktu = idx[live], K[live], u[live], v[live], kv[live], ktu[live]
                        fa, ga, aa, ba, ma, mb = fa[live], ga[live], aa[live], ba[live], ma[live], mb[live]
                        w, prev, live = w[live], prev[live], live[live]
            u_new = aa / np.maximum(kv, tiny)  # padded rows: a = 0 -> u = 0
            u = _relax_np(u, u_new) if relax else u_new
            ktu = np.matmul(u[:, None, :], K)[:, 0, :]  # (b, m)
            v_new = ba / np.maximum(ktu, tiny)
            v = _relax_np(v, v_new) if relax else v_new
            it += 1
        if live.any():  # iteration cap reached: absorb what is left
            kv = np.matmul(K, v[:, :, None])[:, :, 0]
            e = np.abs(u * kv - aa).sum(1) + np.abs(v * ktu - ba).sum(1)
            if not np.isfinite(e[live]).all():
                return f, g, it, torch.from_numpy(err), False
            _absorb(live, e)
    return f_out, g_out, it, torch.from_numpy(err), True


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
        stage = _kernel_stage_cpu if c_k.device.type == "cpu" and not c_k.requires_grad else _kernel_stage
        f1, g1, it, err, ok = stage(c_k, a, b, f, g, e_k, max_iter, check_every, t, omega)
        if not ok:  # an exp-space iterate under/overflowed: redo this stage in the log domain, unrelaxed
            f1, g1, it, err = _log_stage(c_k, a, b, f, g, e_k, max_iter, check_every=check_every, tol=t)
            used = "torch-log"
        f, g, n_iter = f1, g1, n_iter + it
    return f, g, n_iter, err, used


def _result(cost, c_k, a, b, f, g, eps_last, cmin, spread, *, round_plan, n_iter, err, backend, merged=None):
    """Plan from the potentials (normalised units), rounding, expansion of merged duplicates, SinkhornInfo."""
    plan = _kernel(c_k, f, g, eps_last)  # (B, n', m'); 0 on padded entries
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
        raise ConfigError(f"ot.iters: expected {len(schedule)} per-stage counts for schedule {schedule}, got {len(per)}")
    c_n, cmin, spread = normalise_cost(cost, a > 0, b > 0, sync_free=True)
    c_k = _solver_cost(c_n, a, b, sync_free=True)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for e_k, it_k in zip(schedule, per):
        f, g, _, _ = _log_stage(c_k, a, b, f, g, e_k, it_k, omega=omega)
    err = _marginal_err(_kernel(c_k, f, g, schedule[-1]), a, b)
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
    if cost.numel() and not (math.isfinite(float(cost.amin())) and math.isfinite(float(cost.amax()))):
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
