"""OT on the training device: the cost table moved to the trainer's device gives the same D_OT and plans as the
CPU table, with scipy exact as the oracle; on CUDA the fused kernel is the solver that runs.

On this CPU machine "the trainer's device" is what `topd_ds.comm.distributed.device()` returns (cpu); on a GPU machine
(scripts/device_check.sh runs this file) the same tests run with the table on cuda.
"""

import math

import pytest
import torch

from topd_ds.comm import distributed
from topd_ds.config import config_from_dict
from topd_ds.ot import cost_table, exact_ot, token_cost
from topd_ds.ot.sinkhorn import TRITON_MAX_SIDE, choose_backend
from topd_ds.rollout.pipeline import window_ot

DEVICES = ["trainer"] + (["cuda"] if torch.cuda.is_available() else [])


def _cfg(solver="sinkhorn"):
    return config_from_dict({
        "model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
        "ot": {"solver": solver, "eps": 1e-2, "tol": 1e-6, "max_iter": 4000},
        "train": {"global_batch_size": 4, "micro_batch_size": 4}}, check_paths=False)


def _windows(seed, M=24, K=12, V=80, D=32, dtype=torch.float32):
    """Random table and M teacher/student windows of K tokens (repeats: V small), early-stopped tails masked."""
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(V, D, generator=g) * torch.rand(V, 1, generator=g) * 3).to(dtype)  # rows of any length
    t_ids, s_ids = torch.randint(0, V, (M, K), generator=g), torch.randint(0, V, (M, K), generator=g)
    t_mask = torch.ones(M, K, dtype=torch.bool)
    s_mask = torch.ones(M, K, dtype=torch.bool)
    t_mask[1::3, K // 2:] = False  # a teacher continuation that hit EOS
    s_mask[2::4, 2 * K // 3:] = False
    return emb, t_ids, t_mask, s_ids, s_mask


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_on_the_training_device_gives_the_cpu_paths_d_ot_and_plans(where, dtype):
    device = distributed.device() if where == "trainer" else torch.device("cuda")
    emb, t_ids, t_mask, s_ids, s_mask = _windows(seed=11, dtype=dtype)
    table = cost_table(emb, device)
    assert table.device.type == device.type and table.dtype == torch.float32 and table.shape == emb.shape
    assert torch.allclose(table.norm(dim=1).cpu(), torch.ones(emb.shape[0]), atol=1e-6)

    cfg = _cfg()
    on_cpu = window_ot(emb, t_ids, t_mask, s_ids, s_mask, cfg)  # the raw table, on the CPU
    on_dev = window_ot(table, t_ids, t_mask, s_ids, s_mask, cfg)  # costs and Sinkhorn where the table lives
    assert on_dev.plan.device.type == device.type and on_dev.distance.device.type == device.type
    assert on_cpu.backend == "torch"
    assert on_dev.backend == ("triton" if device.type == "cuda" else "torch")  # the fused kernel on CUDA
    d_cpu, d_dev = on_cpu.distance.double(), on_dev.distance.double().cpu()
    p_cpu, p_dev = on_cpu.plan.double(), on_dev.plan.double().cpu()
    # Same backend on the CPU: equal up to float32 rounding of the normalised table. On CUDA the kernel runs fixed
    # iterations instead of the tolerance path: equal to the solvers' tolerances.
    same = device.type == "cpu"
    assert torch.allclose(d_dev, d_cpu, rtol=1e-5 if same else 1e-3, atol=1e-6), (d_dev - d_cpu).abs().max()
    assert float((p_dev - p_cpu).abs().sum((1, 2)).max()) < (1e-4 if same else 2e-3)
    valid = t_mask[:, :, None] & s_mask[:, None, :]
    assert float(p_dev[~valid].abs().max()) == 0.0  # no mass on padding

    # The oracle: scipy exact on the same costs; entropic plans cost at least the optimum and at most the
    # entropic bias above it (eps_abs log(n m), eps_abs = eps x each window's cost spread).
    exact = window_ot(emb, t_ids, t_mask, s_ids, s_mask, _cfg("exact"))
    cost = token_cost(emb, t_ids, s_ids).double()  # (M, K, K)
    _, d_ref = exact_ot(cost, mask_a=t_mask, mask_b=s_mask)
    assert exact.backend == "exact" and torch.allclose(exact.distance.double(), d_ref, atol=1e-6)
    spread = torch.stack([c[v].max() - c[v].min() for c, v in zip(cost, valid)])
    bias = cfg.ot.eps * spread * math.log(t_ids.shape[1] * s_ids.shape[1])
    assert bool((d_dev >= d_ref - 1e-5).all()) and bool((d_dev <= d_ref + bias + 1e-5).all())


def test_auto_backend_is_the_fused_kernel_on_cuda():
    # A pure function of the cost's device and shape, so it is checked here without a GPU.
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert choose_backend("auto", cuda, 50, 50) == "triton"
    assert choose_backend("auto", cuda, 50, 50, fixed_iter=300) == "triton"
    assert choose_backend("auto", cuda, TRITON_MAX_SIDE + 1, 50) == "torch"  # too big for the on-chip block
    assert choose_backend("auto", cpu, 50, 50) == "torch"
    assert choose_backend("auto", cpu, 50, 50, fixed_iter=300) == "torch-log"
    assert choose_backend("torch", cuda, 50, 50) == "torch"
    with pytest.raises(ValueError, match="n, m <= 128"):
        choose_backend("triton", cpu, 200, 50)
    with pytest.raises(ValueError, match="ot.backend"):
        choose_backend("gpu", cpu, 5, 5)


def test_kernel_side_limit_is_the_kernels_own():
    pytest.importorskip("triton")
    from topd_ds.ot.triton_sinkhorn import MAX_SIDE

    assert TRITON_MAX_SIDE == MAX_SIDE  # repeated in sinkhorn.py so that CPU users never import triton


def test_cost_table_refuses_a_non_table():
    with pytest.raises(ValueError, match="embedding: expected"):
        cost_table(torch.zeros(3, 4, 5), "cpu")


def test_trainer_puts_the_ot_table_on_its_device_in_ot_modes():
    # The trainer's own code path (train.ot_table, used by start_pipeline): TOPD-family modes get the unit-row table
    # on the trainer's device; runs that solve no OT keep the table as loaded (no device memory spent on it).
    from topd_ds.train import ot_table

    emb = torch.randn(40, 8, dtype=torch.bfloat16)
    for mode in ("topd", "opd_dw_low_ot", "opd_dw_high_ot"):
        cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                                "topd": {"mode": mode}}, check_paths=False)
        table = ot_table(cfg, emb)
        assert table.device == distributed.device() and table.dtype == torch.float32
        assert torch.allclose(table.cpu(), torch.nn.functional.normalize(emb.float(), dim=1), atol=1e-6)
    for over in ({"topd": {"mode": "opd"}}, {"train": {"stage": "kd", "global_batch_size": 4}}):
        cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"}, **over},
                               check_paths=False)
        assert ot_table(cfg, emb) is emb
