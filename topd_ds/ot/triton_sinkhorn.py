"""Fused log-domain Sinkhorn in Triton: one program per problem, the whole padded n x m block on chip,
all eps stages and iterations in one launch. Imported lazily by `sinkhorn` (CPU users never need triton).

    f, g, n_iter, err = sinkhorn_triton(c_k, a, b, schedule=[1.0, 0.2, 0.04, 0.01], iters=[100, 100, 100, 300])
    report = compile_for_gpu(torch.float32, 64, 64)   # ahead-of-time build for sm_90 on any machine, no GPU

Numerics are tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/test_ot_triton.py), which
never compiles; `compile_for_gpu` runs Triton's real compiler (and the ptxas it ships) for a CUDA target, so
type errors the interpreter hides (e.g. a loop-carried variable changing dtype) fail in CI too. Speed can only
be measured on a GPU. It runs a fixed number of iterations per stage (no early stop).
"""

import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float32, torch.float64)  # every dtype the kernel accepts; each is compiled for sm_90 in CI
MAX_SIDE = 128  # the whole padded BN x BM block lives in registers: 128 x 128 is the largest that compiles sanely
_TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64"}


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
    # Loaded, not a literal: a loop-carried variable keeps its first type, and a Python float is fp32 (an fp64
    # kernel then fails to compile: "Loop-carried variable eps has initial type fp32 but is re-assigned to fp64").
    eps = tl.load(eps_ptr)
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


def block_size(k: int) -> int:
    """Padded block side for a problem side k (a power of two, at least 2)."""
    return max(2, triton.next_power_of_2(k))


def num_warps(block_n: int, block_m: int) -> int:
    """Warps per program: about 8 block entries per thread (4 to 32 warps). The block lives in registers: at
    64 x 64, 4 warps need ~232 registers per thread in float32 and 255 (the cap) in float64; 16 warps need 83
    and 126, with no spills (compiled for sm_90, tests/test_ot_triton.py prints the figures)."""
    return min(32, max(4, block_n * block_m // 256))


def check_inputs(c_k: torch.Tensor) -> None:
    """Refuse, before any launch, what the kernel cannot run: a dtype it was not built for, a side over
    MAX_SIDE, CPU tensors outside the interpreter."""
    if c_k.dtype not in KERNEL_DTYPES:
        raise ValueError(f"cost: the Triton Sinkhorn kernel takes {[str(d) for d in KERNEL_DTYPES]}, got {c_k.dtype}")
    if c_k.shape[1] > MAX_SIDE or c_k.shape[2] > MAX_SIDE:
        raise ValueError(f"cost: the Triton Sinkhorn kernel takes n, m <= {MAX_SIDE}, got {tuple(c_k.shape[1:])}")
    if not c_k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"cost: the Triton Sinkhorn kernel needs CUDA tensors (got {c_k.device}; "
                         "TRITON_INTERPRET=1 runs it on the CPU for tests)")


def sinkhorn_triton(c_k, a, b, *, schedule, iters):
    """Potentials f (B, n), g (B, m) of normalised costs c_k (B, n, m) (entries off the marginals' support are
    ignored); marginals a (B, n), b (B, m), zero = masked.

    Runs iters[k] log-domain iterations at eps = schedule[k] (no early stopping inside the kernel).
    Allocates only the outputs (B (n + m + 1)); the cost is read once into registers.
    -> f, g, n_iter, row-marginal L1 error (B,).
    """
    check_inputs(c_k)
    B, n, m = c_k.shape
    c_k, a, b = c_k.contiguous(), a.contiguous(), b.contiguous()
    eps = torch.tensor(schedule, dtype=c_k.dtype, device=c_k.device)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    err = torch.zeros(B, dtype=c_k.dtype, device=c_k.device)
    it = torch.tensor(iters, dtype=torch.int32, device=c_k.device)
    bn, bm = block_size(n), block_size(m)
    _sinkhorn_kernel[(B,)](c_k, a, b, eps, f, g, err, it, n, m, len(schedule), BN=bn, BM=bm,
                           num_warps=num_warps(bn, bm))
    return f, g, sum(iters), err


def compile_for_gpu(dtype: torch.dtype, block_n: int, block_m: int, *, arch: int = 90) -> dict:
    """Build the kernel ahead of time for CUDA sm_`arch` with Triton's compiler: no GPU needed (ptxas ships
    with triton). Raises triton's CompilationError where the kernel does not compile.

    -> {"dtype", "block", "arch", "num_warps", "registers" (per thread), "shared_bytes" (the launch's dynamic
    shared memory), "static_shared_bytes", "spill_bytes" (stack + local memory)}; all but the first four from
    the cubin's resource usage, read with the cuobjdump triton ships.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype: the Triton Sinkhorn kernel takes {[str(d) for d in KERNEL_DTYPES]}, got {dtype}")
    t = _TRITON_TYPE[dtype]
    sig = {name: f"*{t}" for name in ("c_ptr", "a_ptr", "b_ptr", "eps_ptr", "f_ptr", "g_ptr", "err_ptr")}
    sig |= {"it_ptr": "*i32", "n": "i32", "m": "i32", "n_stages": "i32", "BN": "constexpr", "BM": "constexpr"}
    src = ASTSource(_sinkhorn_kernel, sig, constexprs={"BN": block_n, "BM": block_m})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps(block_n, block_m)})
    usage = _cubin_usage(k.asm["cubin"])
    return dict(dtype=str(dtype).removeprefix("torch."), block=[block_n, block_m], arch=f"sm_{arch}",
                num_warps=k.metadata.num_warps, registers=usage["REG"],
                shared_bytes=k.metadata.shared, static_shared_bytes=usage["SHARED"],
                spill_bytes=usage["STACK"] + usage["LOCAL"])


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in a cubin, from `cuobjdump --dump-resource-usage`."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {key: int(val) for key, val in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}
