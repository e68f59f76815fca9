"""The epsilon stages of the batched Sinkhorn solver: step 4 of `sinkhorn.solve`, on one of three backends.

    f, g, n_iter, err, used = STAGE_SOLVERS[backend](c_k, a, b, schedule, **opts)

All work on the solver cost c_k (B, n, m) (`solver_cost`: the normalised cost C~ in [0, 1] with MASK_COST on
padded entries), marginals a (B, n), b (B, m) that are zero on padding, potentials f, g in C~ units.
  * `tolerance_stages` ("torch"): each stage to a tolerance, by `kernel_stage_cpu` (numpy, CPU tensors: per-op
    overhead dominates there) or `kernel_stage` (torch, any device; stabilised kernel-domain iterations,
    over-relaxed, active set), redone by `log_stage` if an iterate overflows;
  * `fixed_log_stages` ("torch-log"): a static number of `log_stage` iterations per stage, no host sync;
  * `triton_stages` ("triton"): all stages in one launch of the fused CUDA kernel (imported lazily).
"""

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

_ABSORB_HI = 1e30  # absorb the scalings into the potentials when they leave [1/_ABSORB_HI, _ABSORB_HI]
# Kernel exponents are clamped at the floor (exp() of inputs whose result would be subnormal takes a slow path,
# ~8x) and clamped entries are then set to exactly 0 (the threshold is just above exp(floor)).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
_K_FLOOR = {torch.float32: 2e-35, torch.float64: 1e-304}  # exp(-80) = 1.8e-35, exp(-700) = 9.9e-305
MASK_COST = 1e30  # normalised cost given to padded entries inside the solver: their kernel entries are 0


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


def kernel(c_k: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """K = exp((f_i + g_j - C~_ij) / eps), 0 where the exponent is below _EXP_FLOOR (padded entries too). (B, n, m)"""
    z = torch.sub(f[:, :, None], c_k).add_(g[:, None, :]).mul_(1.0 / eps)  # (B, n, m)
    if z.requires_grad:  # autograd through the solver (no caller does so, but it worked before): out of place
        return F.threshold(torch.exp(z.clamp(min=_EXP_FLOOR[z.dtype])), _K_FLOOR[z.dtype], 0.0)
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


def marginal_error(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 marginal error |K 1 - a|_1 + |K^T 1 - b|_1 of a plan K (B, n, m). -> (B,)"""
    return (K.sum(2) - a).abs().sum(1) + (K.sum(1) - b).abs().sum(1)


def log_stage(c_k, a, b, f, g, eps, iters, *, check_every=0, tol=None, omega=1.0):
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
            err = marginal_error(kernel(c_k, f, g, eps), a, b)
            if tol is not None and float(err.max()) < tol:
                break
    return f, g, it, err


def kernel_stage(c_k, a, b, f, g, eps, max_iter, check_every, tol, omega):
    """Stabilised kernel-domain Sinkhorn at one eps, over-relaxed, with an active set of unconverged problems.

    Returns f, g (absorbed), iterations run, marginal L1 error (B,), ok (False if an iterate went non-finite:
    the caller then redoes the stage in the log domain).
    """
    tiny = torch.finfo(c_k.dtype).tiny
    B = c_k.shape[0]
    relax = omega != 1.0
    err = torch.zeros(B, dtype=c_k.dtype, device=c_k.device)
    idx = torch.arange(B, device=c_k.device)  # active problems
    K = kernel(c_k, f, g, eps)  # (B, n, m)
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
            big |= torch.where(ma > 0, u, 1.0).amin(1) < 1 / _ABSORB_HI  # padded positions (0) do not count
            big |= torch.where(mb > 0, v, 1.0).amin(1) < 1 / _ABSORB_HI
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
                    K[rows] = kernel(c_k[idx[rows]], fa[rows], ga[rows], eps)
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


def kernel_stage_cpu(c_k, a, b, f, g, eps, max_iter, check_every, tol, omega):
    """`kernel_stage` in numpy, for CPU tensors: the same iteration with ~5x less overhead per iteration.

    On the CPU the time goes to the tail: a few slow problems iterating in a small active set, where torch's
    per-op dispatch (~5-10 us) outweighs the arithmetic. Converged problems are marked dead and dropped from the
    arrays only once a quarter of the batch is dead (each compaction copies K). Same returns as `kernel_stage`.
    """
    K = kernel(c_k, f, g, eps).numpy()  # (B, n, m), writable view
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
                big |= np.where(ma > 0, u, 1.0).min(1) < 1 / _ABSORB_HI  # padded positions (0) do not count
                big |= np.where(mb > 0, v, 1.0).min(1) < 1 / _ABSORB_HI
                done = (e < tol) & live
                big &= live & ~done
                if done.any() or big.any():
                    _absorb(done | big, e)
                    if big.any():  # rebuild the kernels of the re-absorbed problems, restart their scalings
                        rows = np.flatnonzero(big)
                        K[rows] = kernel(c_k[torch.from_numpy(idx[rows])], torch.from_numpy(fa[rows]),
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


def solver_cost(c_n: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, sync_free: bool = False) -> torch.Tensor:
    """C~ with MASK_COST on entries of zero-mass rows/columns, so their kernel entries are exactly 0. (B, n, m)"""
    ma, mb = a > 0, b > 0
    if not sync_free and bool(ma.all()) and bool(mb.all()):
        return c_n
    invalid = 1.0 - ma.to(c_n.dtype)[:, :, None] * mb.to(c_n.dtype)[:, None, :]  # (B, n, m)
    return invalid.mul_(MASK_COST).add_(c_n)


def tolerance_stages(c_k, a, b, schedule, *, max_iter, tol, stage_tol, check_every, omega):
    """Each eps stage to a tolerance (the last to `tol`, the others to max(tol, stage_tol)), warm-started.
    -> f, g (C~ units), iterations (all stages), marginal error (B,) of the last stage, backend used."""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    n_iter, used, err = 0, "torch", torch.zeros_like(a[:, 0])
    tiny = torch.finfo(a.dtype).tiny
    log_a = torch.where(a > 0, torch.log(a.clamp_min(tiny)), 0.0)  # (B, n)
    log_b = torch.where(b > 0, torch.log(b.clamp_min(tiny)), 0.0)  # (B, m)
    stage = kernel_stage_cpu if c_k.device.type == "cpu" and not c_k.requires_grad else kernel_stage
    for k, e_k in enumerate(schedule):
        t = tol if k == len(schedule) - 1 else max(tol, stage_tol)
        if k > 0:  # warm start: keep f - eps log a, not f (P = a b^T exp((f~ + g~ - C)/eps) varies smoothly in eps;
            # with non-uniform a, e.g. merged duplicates, f alone starts the next stage off by (eps' - eps) log a)
            f = f + (e_k - schedule[k - 1]) * log_a
            g = g + (e_k - schedule[k - 1]) * log_b
        f1, g1, it, err, ok = stage(c_k, a, b, f, g, e_k, max_iter, check_every, t, omega)
        if not ok:  # an exp-space iterate under/overflowed: redo this stage in the log domain, unrelaxed
            f1, g1, it, err = log_stage(c_k, a, b, f, g, e_k, max_iter, check_every=check_every, tol=t)
            used = "torch-log"
        f, g, n_iter = f1, g1, n_iter + it
    return f, g, n_iter, err, used


def fixed_log_stages(c_k, a, b, schedule, *, iters, omega=1.0):
    """iters[k] log-domain iterations at the k-th eps, no host sync, no data-dependent control flow (CUDA-graph
    safe). -> f, g, iterations, marginal error (B,) of the final potentials, "torch-log"."""
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for e_k, it_k in zip(schedule, iters):
        f, g, _, _ = log_stage(c_k, a, b, f, g, e_k, it_k, omega=omega)
    return f, g, sum(iters), marginal_error(kernel(c_k, f, g, schedule[-1]), a, b), "torch-log"


def triton_stages(c_k, a, b, schedule, *, iters):
    """All stages in one launch of the fused kernel (CUDA; the interpreter on the CPU). -> as `fixed_log_stages`,
    with the row-marginal error only, "triton"."""
    from topd_ds.ot.triton_sinkhorn import sinkhorn_triton  # lazy: CPU users never import triton

    # Triton launches on the current CUDA device: make it the cost's (the pipeline's thread starts on cuda:0)
    with torch.cuda.device(c_k.device) if c_k.is_cuda else contextlib.nullcontext():
        f, g, n_iter, err = sinkhorn_triton(c_k, a, b, schedule=schedule, iters=iters)
    return f, g, n_iter, err, "triton"


STAGE_SOLVERS = {"torch": tolerance_stages, "torch-log": fixed_log_stages, "triton": triton_stages}
