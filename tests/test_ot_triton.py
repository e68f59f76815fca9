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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_compiles_for_sm90_in_every_accepted_dtype(dtype, record_property):
    """Triton's real compiler (not the interpreter, which never compiles) builds the kernel for an H100/H200
    target on this CPU, at the paper's K = 50 (block 64) and at the largest side; registers, shared memory and
    spills are reported (`pytest -s` prints them; junit XML records them)."""
    import torch

    from topd_ds.ot.triton_sinkhorn import KERNEL_DTYPES, MAX_SIDE, compile_for_gpu

    dt = getattr(torch, dtype)
    assert dt in KERNEL_DTYPES
    for block in (64, MAX_SIDE):
        report = compile_for_gpu(dt, block, block, arch=90)
        print(report)
        record_property(f"sm90_{dtype}_{block}", report)
        assert report["arch"] == "sm_90" and 0 < report["registers"] <= 255, report
        if block == 64:  # the trainer's windows (K = 50): no register spills
            assert report["spill_bytes"] == 0, report


def test_kernel_refuses_what_it_cannot_run_before_launch():
    import torch

    from topd_ds.ot.triton_sinkhorn import check_inputs, compile_for_gpu

    with pytest.raises(ValueError, match="float16"):
        check_inputs(torch.zeros(2, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="n, m <= 128"):
        check_inputs(torch.zeros(1, 130, 4))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            check_inputs(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="bfloat16"):
        compile_for_gpu(torch.bfloat16, 64, 64)
