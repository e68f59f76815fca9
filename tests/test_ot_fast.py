"""The CPU speed paths of the OT core: duplicate merging, over-relaxation, the numpy stage, sync-free fixed iterations.

Each is checked against an independent reference: scipy exact OT, the unmerged / unrelaxed solver, the torch
stage, the tolerance path run for the same iterations.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from topd_ds.ot import ConvergenceWarning, exact_ot, sinkhorn, sinkhorn_fixed, stages, token_cost
from topd_ds.ot.dedup import duplicate_groups, expand_plan, merge_duplicates
from topd_ds.ot.sinkhorn import normalise_cost, resolve_marginals


def _windows(seed, B, n, m, vocab, dim=16, pad=True):
    """Token-window costs with repeated tokens (small vocabulary) and, optionally, padded tails."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    ids_a = torch.randint(0, vocab, (B, n), generator=g)
    ids_b = torch.randint(0, vocab, (B, m), generator=g)
    cost = token_cost(emb, ids_a, ids_b).double()
    mask_a = torch.ones(B, n, dtype=torch.bool)
    mask_b = torch.ones(B, m, dtype=torch.bool)
    if pad:
        mask_a[:, n - 1 - torch.randint(0, n // 2 + 1, (1,), generator=g) :] = False
        mask_b[0, m // 2 :] = False
    return cost, ids_a, ids_b, mask_a, mask_b


def test_duplicate_groups_match_token_ids():
    cost, ids_a, _, mask_a, _ = _windows(0, 5, 12, 9, vocab=4)
    a, b = resolve_marginals(cost, mask_a=mask_a)
    c_n, _, _ = normalise_cost(cost, a > 0, b > 0)
    group, first, n_r = duplicate_groups(c_n.contiguous(), a > 0)
    for k in range(5):
        real = mask_a[k].nonzero()[:, 0]
        n_tok = len(set(ids_a[k, real].tolist()))
        assert int(group[k, real].max()) + 1 == n_tok  # one slot per distinct token among real rows
        for i in real.tolist():
            for j in real.tolist():  # same slot iff same token
                assert (group[k, i] == group[k, j]) == (ids_a[k, i] == ids_a[k, j])
            assert ids_a[k, first[k, group[k, i]]] == ids_a[k, i]
    assert n_r == max(len(set(ids_a[k, mask_a[k]].tolist())) for k in range(5))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), m=st.integers(2, 9), vocab=st.integers(1, 5))
def test_merged_exact_ot_expands_to_the_exact_optimum(seed, n, m, vocab):
    # Exactness of the merge for unregularised OT: solve the merged problem (general marginals: linprog), expand,
    # and compare with scipy exact on the original problem (assignment / linprog).
    cost, _, _, mask_a, mask_b = _windows(seed, 3, n, m, vocab)
    a, b = resolve_marginals(cost, mask_a=mask_a, mask_b=mask_b)
    c_n, _, _ = normalise_cost(cost, a > 0, b > 0)
    red = merge_duplicates(c_n, a, b, min_gain=1.0)
    assert red is not None
    plan_r, _ = exact_ot(red.cost, red.a, red.b)
    plan = expand_plan(plan_r, red, a, b)
    _, d_exact = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
    assert torch.allclose(plan.sum(2), a, atol=1e-9) and torch.allclose(plan.sum(1), b, atol=1e-9)
    assert float(plan[~(mask_a[:, :, None] & mask_b[:, None, :])].abs().max()) == 0.0  # no mass on padding
    assert torch.allclose((plan * cost).sum((1, 2)), d_exact, atol=1e-7 * (1 + float(d_exact.abs().max())))


def test_dedup_gives_the_same_sinkhorn_iterates():
    # Merging is exact for entropic OT and Sinkhorn's iterates map one to one: same plan at any iteration count.
    cost, _, _, mask_a, mask_b = _windows(1, 6, 14, 11, vocab=5)
    for kw in (dict(tol=0.0, stage_tol=0.0, max_iter=20), dict(tol=1e-9, max_iter=3000)):
        p1, i1 = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=1e-2, omega=1.0, dedup=True, **kw)
        p0, i0 = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=1e-2, omega=1.0, dedup=False, **kw)
        assert torch.allclose(p1, p0, atol=1e-12), (p1 - p0).abs().max()
        assert torch.allclose(i1.distance, i0.distance, atol=1e-12)
        # Potentials are defined up to (f + c, g - c); f_i + g_j is not.
        fg1 = i1.f[:, :, None] + i1.g[:, None, :]
        fg0 = i0.f[:, :, None] + i0.g[:, None, :]
        valid = mask_a[:, :, None] & mask_b[:, None, :]
        assert torch.allclose(fg1[valid], fg0[valid], atol=1e-9)
    # Copies of a token split their merged row evenly (uniform marginals).
    a, b = resolve_marginals(cost, mask_a=mask_a, mask_b=mask_b)
    c_n, _, _ = normalise_cost(cost, a > 0, b > 0)
    red = merge_duplicates(c_n, a, b, min_gain=1.0)
    for k in range(6):
        for i in mask_a[k].nonzero()[:, 0].tolist():
            i0 = int((red.row_group[k] == red.row_group[k, i]).nonzero()[0, 0])
            assert torch.equal(p1[k, i], p1[k, i0])


@pytest.mark.parametrize("omega", [1.0, 1.8])
def test_numpy_stage_equals_torch_stage(omega):
    # The CPU path runs the kernel-domain stage in numpy; the torch stage (used on GPUs) must do the same iteration.
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(9, 8, 7, generator=g, dtype=torch.float64)
    mask_a, mask_b = torch.rand(9, 8, generator=g) > 0.2, torch.rand(9, 7, generator=g) > 0.2
    a, b = resolve_marginals(cost, mask_a=mask_a, mask_b=mask_b)
    c_n, _, _ = normalise_cost(cost, a > 0, b > 0)
    c_k = stages.solver_cost(c_n, a, b)
    f0, g0 = torch.zeros_like(a), torch.zeros_like(b)
    for tol in (1e-6, 0.0):
        f1, g1, it1, e1, ok1 = stages.kernel_stage(c_k, a, b, f0, g0, 0.05, 300, 10, tol, omega)
        f2, g2, it2, e2, ok2 = stages.kernel_stage_cpu(c_k, a, b, f0, g0, 0.05, 300, 10, tol, omega)
        assert ok1 and ok2 and it1 == it2
        assert torch.allclose(f1, f2, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)
        assert torch.allclose(e1, e2, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.sampled_from([3, 8, 1000]), eps=st.sampled_from([1e-3, 1e-2]))
@example(seed=529, vocab=8, eps=1e-2)  # both paths stop at max_iter short of tol here: compared only where converged
def test_relaxed_dedup_solver_matches_exact(seed, vocab, eps):
    # The default path (over-relaxation + dedup) on windows with repeated tokens and padding, against scipy exact.
    cost, _, _, mask_a, mask_b = _windows(seed, 4, 10, 8, vocab)
    tol = 1e-6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, info = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=eps, tol=tol, max_iter=5000)
    # a plan short of tol is said so, and only then
    assert any(w.category is ConvergenceWarning for w in caught) == bool((info.marginal_err > tol).any())
    _, d = exact_ot(cost, mask_a=mask_a, mask_b=mask_b)
    a, b = resolve_marginals(cost, mask_a=mask_a, mask_b=mask_b)
    assert torch.isfinite(plan).all() and bool((plan >= 0).all())
    assert torch.allclose(plan.sum(2), a, atol=1e-9) and torch.allclose(plan.sum(1), b, atol=1e-9)
    valid = mask_a[:, :, None] & mask_b[:, None, :]
    assert float(plan[~valid].abs().max()) == 0.0
    spread = torch.stack([(c[v].max() - c[v].min()) for c, v in zip(cost, valid)])
    slack = 1e-6 * (spread + 1) + 1e-12
    assert bool((info.distance - d >= -slack).all())  # entropic plans cost at least the optimum
    assert bool((info.distance - d <= eps * spread * np.log(10 * 8) + slack).all())  # entropic bias bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, i1 = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=eps, tol=tol, max_iter=5000, omega=1.0, dedup=False)
    # Plain Sinkhorn needs > 5000 iterations on ~20% of these problems (ties from small vocabularies at eps 1e-2),
    # and two solutions stopped short of tol differ by more than tol says: compare where both reached it.
    both = (info.marginal_err <= tol) & (i1.marginal_err <= tol)
    assert torch.allclose(info.distance[both], i1.distance[both], atol=1e-5 * float(spread.max()))


def test_sinkhorn_warns_when_it_stops_short_of_tol():
    cost = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="max_iter=20"):
        _, info = sinkhorn(cost, eps=1e-3, tol=1e-9, max_iter=20)
    assert bool((info.marginal_err > 1e-9).any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: silent
        _, info = sinkhorn(cost, eps=0.1, tol=1e-6, max_iter=5000)
    assert bool((info.marginal_err <= 1e-6).all())


def test_relaxation_reduces_iterations_and_stays_finite():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(16, 20, 20, generator=g)
    _, i1 = sinkhorn(cost, eps=1e-3, tol=1e-4, omega=1.0)
    _, i2 = sinkhorn(cost, eps=1e-3, tol=1e-4, omega=1.8)
    assert i2.n_iter < i1.n_iter, (i1.n_iter, i2.n_iter)
    assert torch.allclose(i1.distance, i2.distance, rtol=1e-3)
    for c in (torch.zeros(2, 5, 5), cost[:2] * 1e6, cost[:2] * 1e-6, (cost[:2] > 0.5).float()):
        for eps in (1e-3, 1e-1):
            plan, info = sinkhorn(c, eps=eps, omega=1.9)
            assert torch.isfinite(plan).all() and torch.isfinite(info.f).all() and torch.isfinite(info.g).all()
    with pytest.raises(ValueError, match="ot.omega"):
        sinkhorn(cost, omega=2.0)


def test_fixed_entry_equals_tolerance_path_for_the_same_iterations():
    # With tol = 0 the tolerance path runs max_iter iterations at every eps stage: the same iterations as
    # sinkhorn_fixed with that count per stage (kernel domain with absorption vs log domain: equal up to rounding).
    cost, _, _, mask_a, mask_b = _windows(4, 5, 9, 7, vocab=50)
    a, b = resolve_marginals(cost, mask_a=mask_a, mask_b=mask_b)
    for scaling, n_stages in ((None, 1), (0.2, 4)):  # eps 1e-2 at ratio 0.2: stages 1, 0.2, 0.04, 0.01
        for n in (1, 7, 40):
            p_tol, i_tol = sinkhorn(cost, a, b, eps=1e-2, eps_scaling=scaling, tol=0.0, stage_tol=0.0, max_iter=n,
                                    omega=1.0, dedup=False)
            p_fix, i_fix = sinkhorn_fixed(cost, a, b, eps=1e-2, eps_scaling=scaling, iters=[n] * n_stages)
            assert i_fix.n_iter == i_tol.n_iter == n * n_stages
            assert torch.allclose(p_fix, p_tol, atol=1e-12), (p_fix - p_tol).abs().max()
            assert torch.allclose(i_fix.distance, i_tol.distance, atol=1e-12)
            assert torch.allclose(i_fix.marginal_err, i_tol.marginal_err, atol=1e-12)
    # sinkhorn(fixed_iter=N) is the same entry after validation; masks carry no mass.
    p1, _ = sinkhorn(cost, mask_a=mask_a, mask_b=mask_b, eps=1e-2, fixed_iter=80)
    p2, _ = sinkhorn_fixed(cost, a, b, eps=1e-2, iters=80)
    assert torch.equal(p1, p2)
    assert float(p2[~(mask_a[:, :, None] & mask_b[:, None, :])].abs().max()) == 0.0
    with pytest.raises(ValueError, match="ot.iters"):
        sinkhorn_fixed(cost, a, b, eps=1e-2, iters=[10, 10])


def test_fixed_entry_traces_without_graph_breaks():
    # No GPU here, so CUDA-graph capture itself cannot run. Its preconditions can: no host sync and no
    # data-dependent Python control flow, i.e. torch.compile(fullgraph=True) traces the whole call.
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    mask_a = torch.ones(3, 6, dtype=torch.bool)
    mask_a[1, 4:] = False
    a, b = resolve_marginals(cost, mask_a=mask_a)
    fn = torch.compile(lambda c, a, b: sinkhorn_fixed(c, a, b, eps=1e-2, eps_scaling=None, iters=4),
                       fullgraph=True, backend="eager")
    p1, i1 = fn(cost, a, b)
    p2, i2 = sinkhorn_fixed(cost, a, b, eps=1e-2, eps_scaling=None, iters=4)
    assert torch.equal(p1, p2) and torch.equal(i1.distance, i2.distance)

    def synced(c, a, b):  # negative control: a host sync must break the trace
        p, info = sinkhorn_fixed(c, a, b, eps=1e-2, eps_scaling=None, iters=4)
        return p * 2 if float(info.marginal_err.max()) > 1.0 else p

    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(synced, fullgraph=True, backend="eager")(cost, a, b)


def test_autograd_still_flows_through_the_solver():
    # The CPU fast path is numpy and in place; a cost that requires grad takes the torch path out of place.
    emb = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(6)
    ids_a, ids_b = torch.randint(0, 30, (4, 6), generator=g), torch.randint(0, 30, (4, 6), generator=g)
    cost = token_cost(emb, ids_a, ids_b).double()  # (4, 6, 6), requires grad
    plan, info = sinkhorn(cost, eps=1e-2, tol=1e-10, max_iter=5000)
    plan_ref, info_ref = sinkhorn(cost.detach(), eps=1e-2, tol=1e-10, max_iter=5000)
    assert torch.allclose(plan.detach(), plan_ref, atol=1e-9)
    assert torch.allclose(info.distance.detach(), info_ref.distance, atol=1e-9)
    info.distance.sum().backward()
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all()) and float(emb.grad.abs().sum()) > 0
