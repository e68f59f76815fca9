"""The fused Triton Sinkhorn kernel equals the torch path, run on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the check runs in a subprocess (the variable
does not leak into the rest of the test session).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from topd_ds.ot import exact_ot, sinkhorn
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    mask_a = torch.ones(3, 6, dtype=torch.bool); mask_a[1, 4:] = False
    mask_b = torch.ones(3, 5, dtype=torch.bool); mask_b[2, 3:] = False
    kw = dict(mask_a=mask_a, mask_b=mask_b, eps=1e-2, eps_scaling=0.2)
    p_t, i_t = sinkhorn(cost, backend="triton", fixed_iter=300, **kw)
    p_r, i_r = sinkhorn(cost, backend="torch", fixed_iter=300, **kw)
    assert i_t.backend == "triton", i_t.backend
    assert torch.allclose(p_t, p_r, atol=1e-8), (p_t - p_r).abs().max()
    assert torch.allclose(i_t.distance, i_r.distance, atol=1e-9)
    assert float(p_t[1, 4:].abs().max()) == 0.0 and float(p_t[2, :, 3:].abs().max()) == 0.0
    _, d = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
    assert float(((i_t.distance - d) / d).abs().max()) < 2e-2
    print("OK")
""")


def test_triton_kernel_matches_torch_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
