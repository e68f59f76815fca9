"""Fused log-domain Sinkhorn in Triton: one program per problem, the whole padded n x m block on chip,
all eps stages and iterations in one launch. Imported lazily by `sinkhorn` (CPU users never need triton).

Numerics are tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/test_ot_triton.py);
its speed can only be measured on a GPU. It runs a fixed number of iterations per stage (no early stop).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _sinkhorn_kernel(c_ptr, a_ptr, b_ptr, eps_ptr, f_ptr, g_ptr, err_ptr, it_ptr, n, m, n_stages,
                     BN: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)
    ri = tl.arange(0, BN)
    cj = tl.arange(0, BM)
    a = tl.load(a_ptr + pid * n + ri, mask=ri < n, other=0.0)  # (BN,)
    b = tl.load(b_ptr + pid * m + cj, mask=cj < m, other=0.0)  # (BM,)
    ma = a > 0
    mb = b > 0
    valid = ma[:, None] & mb[None, :]
    c = tl.load(c_ptr + pid * n * m + ri[:, None] * m + cj[None, :], mask=(ri[:, None] < n) & (cj[None, :] < m),
                other=0.0)  # (BN, BM)
    log_a = tl.log(tl.where(ma, a, 1.0))
    log_b = tl.log(tl.where(mb, b, 1.0))
    f = tl.zeros([BN], dtype=c.dtype)
    g = tl.zeros([BM], dtype=c.dtype)
    eps = 1.0
    for s in range(n_stages):
        eps = tl.load(eps_ptr + s)
        for _ in range(tl.load(it_ptr + s)):
            z = tl.where(valid, (g[None, :] - c) / eps, -float("inf"))
            zmax = tl.max(z, axis=1)
            zmax = tl.where(zmax > -float("inf"), zmax, 0.0)
            lse = zmax + tl.log(tl.sum(tl.exp(z - zmax[:, None]), axis=1))
            f = tl.where(ma, eps * (log_a - lse), 0.0)
            z = tl.where(valid, (f[:, None] - c) / eps, -float("inf"))
            zmax = tl.max(z, axis=0)
            zmax = tl.where(zmax > -float("inf"), zmax, 0.0)
            lse = zmax + tl.log(tl.sum(tl.exp(z - zmax[None, :]), axis=0))
            g = tl.where(mb, eps * (log_b - lse), 0.0)
    p = tl.where(valid, tl.exp((f[:, None] + g[None, :] - c) / eps), 0.0)
    err = tl.sum(tl.abs(tl.sum(p, axis=1) - a), axis=0)
    tl.store(f_ptr + pid * n + ri, f, mask=ri < n)
    tl.store(g_ptr + pid * m + cj, g, mask=cj < m)
    tl.store(err_ptr + pid, err)


def sinkhorn_triton(c_n, a, b, *, schedule, iters):
    """Potentials f (B, n), g (B, m) of normalised costs c_n (B, n, m) in [0, 1]; marginals a, b (zero = masked).

    Runs iters[k] log-domain iterations at eps = schedule[k] (no early stopping inside the kernel).
    -> f, g, n_iter, row-marginal L1 error (B,).
    """
    B, n, m = c_n.shape
    c_n, a, b = c_n.contiguous(), a.contiguous(), b.contiguous()
    eps = torch.tensor(schedule, dtype=c_n.dtype, device=c_n.device)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    err = torch.zeros(B, dtype=c_n.dtype, device=c_n.device)
    it = torch.tensor(iters, dtype=torch.int32, device=c_n.device)
    bn = max(2, triton.next_power_of_2(n))
    bm = max(2, triton.next_power_of_2(m))
    _sinkhorn_kernel[(B,)](c_n, a, b, eps, f, g, err, it, n, m, len(schedule), BN=bn, BM=bm)
    return f, g, sum(iters), err
