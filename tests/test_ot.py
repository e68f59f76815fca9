"""OT core: Sinkhorn against the scipy exact oracle, the oracle against brute force, masks, degenerate costs."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linprog

from topd_ds.ot import exact_ot, ot_distance, sinkhorn, token_cost


def _linprog(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """min <P, c> over plans with marginals a, b, by scipy's LP solver on the raw cost (exact_ot rescales the cost and
    takes the assignment shortcut for uniform square problems; this oracle does neither)."""
    n, m = c.shape
    A = np.zeros((n + m, n * m))
    for i in range(n):
        A[i, i * m:(i + 1) * m] = 1
    for j in range(m):
        A[n + j, j::m] = 1
    return linprog(c.ravel(), A_eq=A, b_eq=np.concatenate([a, b]), method="highs").fun


def _rand_cost(B, n, m, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, n, m, generator=g, dtype=dtype)


def test_exact_matches_brute_force_permutations():
    for seed in range(4):
        for n in (1, 3, 5):
            c = _rand_cost(1, n, n, seed)[0]
            best = min(sum(float(c[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n))) / n
            plan, d = exact_ot(c)
            assert abs(float(d) - best) < 1e-12
            assert torch.allclose(plan.sum(0), torch.full((n,), 1.0 / n, dtype=c.dtype))


def test_exact_general_marginals_match_linprog():
    c = _rand_cost(1, 4, 6, 7)[0]
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    b = torch.full((6,), 1 / 6, dtype=torch.float64)
    plan, d = exact_ot(c, a, b)
    assert abs(float(d) - _linprog(c.numpy(), a.numpy(), b.numpy())) < 1e-9
    assert torch.allclose(plan.sum(1), a, atol=1e-9) and torch.allclose(plan.sum(0), b, atol=1e-9)


@pytest.mark.parametrize("n,m", [(12, 12), (8, 11)])
def test_sinkhorn_converges_to_exact(n, m):
    # Documented: at eps = 1e-3 (relative to the cost spread) the relative error vs exact is < 1e-3.
    cost = _rand_cost(6, n, m, 1) + 0.5
    _, d_exact = exact_ot(cost)
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        plan, info = sinkhorn(cost, eps=eps, tol=1e-6, max_iter=5000)
        errs.append(float(((info.distance - d_exact).abs() / d_exact).max()))
        assert torch.allclose(plan.sum(2), torch.full((6, n), 1 / n, dtype=cost.dtype), atol=1e-9)
        assert torch.allclose(plan.sum(1), torch.full((6, m), 1 / m, dtype=cost.dtype), atol=1e-9)
        assert float(info.marginal_err.max()) < 1e-4  # tol 1e-6 needs >5000 iterations at eps 1e-3
    assert errs[0] > errs[2] and errs[2] < 1e-3, errs


def test_masks_put_no_mass_on_padding():
    cost = _rand_cost(3, 7, 9, 2)
    mask_a = torch.ones(3, 7, dtype=torch.bool)
    mask_b = torch.ones(3, 9, dtype=torch.bool)
    mask_a[0, 5:] = False
    mask_b[1, 2:] = False
    mask_a[2], mask_b[2] = False, False  # fully masked problem
    plan, info = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=1e-2, tol=1e-8)
    assert float(plan[0, 5:].abs().max()) == 0.0 and float(plan[1, :, 2:].abs().max()) == 0.0
    assert float(plan[2].abs().max()) == 0.0 and float(info.distance[2]) == 0.0
    assert abs(float(plan[0].sum()) - 1.0) < 1e-9 and abs(float(plan[1].sum()) - 1.0) < 1e-9
    # Same answer as the unpadded sub-problems.
    _, i0 = sinkhorn(cost[:1, :5], eps=1e-2, tol=1e-8)
    _, i1 = sinkhorn(cost[1:2, :, :2], eps=1e-2, tol=1e-8)
    assert abs(float(i0.distance[0] - info.distance[0])) < 1e-7
    assert abs(float(i1.distance[0] - info.distance[1])) < 1e-7
    _, d_exact = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
    assert float(d_exact[2]) == 0.0


def test_permutation_invariance():
    cost = _rand_cost(2, 6, 8, 3)
    pr, pc = torch.randperm(6), torch.randperm(8)
    plan, info = sinkhorn(cost, eps=1e-2, tol=1e-9)
    plan2, info2 = sinkhorn(cost[:, pr][:, :, pc], eps=1e-2, tol=1e-9)
    assert torch.allclose(info.distance, info2.distance, atol=1e-8)
    assert torch.allclose(plan[:, pr][:, :, pc], plan2, atol=1e-7)


def test_float32_matches_float64():
    cost = _rand_cost(4, 10, 10, 4)
    _, i64 = sinkhorn(cost, eps=1e-2, tol=1e-6)
    _, i32 = sinkhorn(cost.float(), eps=1e-2, tol=1e-5)
    assert torch.allclose(i32.distance.double(), i64.distance, rtol=1e-4)


def test_all_equal_and_tiny_eps_never_nan():
    for cost in (torch.zeros(2, 5, 5), torch.full((2, 4, 6), 3.0), _rand_cost(2, 5, 5, 5).float() * 1e6):
        plan, info = sinkhorn(cost, eps=1e-3)
        assert torch.isfinite(plan).all() and torch.isfinite(info.distance).all()
        assert torch.isfinite(info.f).all() and torch.isfinite(info.g).all()
    plan, info = sinkhorn(torch.full((1, 4, 6), 3.0, dtype=torch.float64), eps=0.05)
    assert torch.allclose(plan, torch.full_like(plan, 1 / 24)) and abs(float(info.distance[0]) - 3.0) < 1e-12


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), scale=st.sampled_from([0.0, 1e-6, 1.0, 1e4]),
       seed=st.integers(0, 10_000), kind=st.sampled_from(["rand", "ties", "huge"]))
def test_hypothesis_random_problems(n, m, scale, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        cost = torch.randint(0, 2, (2, n, m), generator=g).double() * scale
    elif kind == "huge":
        cost = torch.rand(2, n, m, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 7, (2, n, m), generator=g)
    else:
        cost = torch.rand(2, n, m, generator=g, dtype=torch.float64) * scale
    plan, info = sinkhorn(cost, eps=1e-3, tol=1e-6)
    _, d = exact_ot(cost)
    assert torch.isfinite(plan).all() and bool((plan >= 0).all())
    assert torch.allclose(plan.sum(2), torch.full((2, n), 1 / n, dtype=cost.dtype), atol=1e-8)
    spread = (cost.amax(dim=(1, 2)) - cost.amin(dim=(1, 2)))
    # Entropic bias bound: <P, C> - OT <= eps_abs * log(n m) (+ the marginal tolerance times the spread).
    slack = 1e-6 * (spread + cost.abs().amax(dim=(1, 2))) + 1e-12  # linprog (HiGHS) tolerances ~1e-7 relative
    assert bool((info.distance - d >= -slack).all())
    assert bool((info.distance - d <= spread * 1e-3 * np.log(n * m + 1) + slack).all())


def test_token_cost_and_ot_distance():
    emb = torch.randn(20, 16).to(torch.bfloat16)
    ids_a = torch.randint(0, 20, (3, 5))
    ids_b = ids_a[:, torch.randperm(5)]
    cost = token_cost(emb, ids_a, ids_b)
    e = emb.float()
    e = e / e.norm(dim=-1, keepdim=True)
    ref = 1 - torch.einsum("bnd,bmd->bnm", e[ids_a], e[ids_b])
    assert cost.dtype == torch.float32 and torch.allclose(cost, ref.clamp(0, 2), atol=1e-5)
    assert torch.allclose(token_cost(emb, ids_a, ids_b, metric="sqeuclidean"), 2 * cost)
    res = ot_distance(cost, solver="exact")
    assert float(res.distance.abs().max()) == 0.0  # student window is a permutation of the teacher's
    res2 = ot_distance(cost, eps=1e-3)
    assert float(res2.distance.max()) < 1e-3


def test_position_cost_and_window_ot_with_it_match_loops_and_linprog():
    from topd_ds.config import config_from_dict
    from topd_ds.ot.cost import position_cost
    from topd_ds.rollout.pipeline import window_ot

    n, m, w = 5, 7, float(np.random.default_rng().uniform(0.2, 3.0))
    ref = torch.tensor([[w * abs(i - j) / max(n, m) for j in range(m)] for i in range(n)])
    assert torch.allclose(position_cost(n, m, w), ref, atol=1e-7)
    emb = torch.randn(12, 8)
    t_ids, s_ids = torch.randint(0, 12, (3, n)), torch.randint(0, 12, (3, m))
    t_mask, s_mask = torch.ones(3, n, dtype=torch.bool), torch.ones(3, m, dtype=torch.bool)

    def run(weight):
        cfg = config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                                "topd": {"position_cost": weight}, "ot": {"solver": "exact"}}, check_paths=False)
        return window_ot(emb, t_ids, t_mask, s_ids, s_mask, cfg)

    with_pos, without = run(w), run(0.0)
    token = token_cost(emb, t_ids, s_ids).double()
    for b in range(3):
        assert abs(float(with_pos.distance[b]) - _linprog((token[b] + ref.double()).numpy(), np.full(n, 1 / n), np.full(m, 1 / m))) < 1e-6
        assert abs(float(without.distance[b]) - _linprog(token[b].numpy(), np.full(n, 1 / n), np.full(m, 1 / m))) < 1e-6


def test_position_cost_matches_a_repeated_token_on_the_diagonal():
    """Identical windows 'a b a': token cost alone is 0 for a->a at either place, so a plan may cross the two a's;
    with the position term only the diagonal costs 0, and it is the unique optimum."""
    from topd_ds.ot.cost import position_cost

    emb = torch.eye(2)
    ids = torch.tensor([[0, 1, 0]])
    crossed = torch.zeros(3, 3, dtype=torch.float64)
    crossed[0, 2] = crossed[2, 0] = crossed[1, 1] = 1 / 3
    cost = token_cost(emb, ids, ids)[0].double()
    assert float((crossed * cost).sum()) == 0.0  # optimal without the position term
    cost = cost + position_cost(3, 3, 1.0).double()
    plan, d = exact_ot(cost)
    assert float(d) == 0.0 and torch.allclose(plan, torch.eye(3, dtype=torch.float64) / 3)
    assert float((crossed * cost).sum()) > 0.1
