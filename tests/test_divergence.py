"""topd_ds.rollout.divergence against pure-Python / numpy references (sorted lists, np.median, np.percentile)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_ds.rollout import divergence as D


def k_ref(n, fraction, count):
    if count is not None:
        return min(count, n)
    k = math.floor(n * fraction + 0.5)
    if fraction > 0 and n > 0:
        k = max(k, 1)
    return min(k, n)


def select_ref(loss, mask, *, fraction=None, count=None, mode="high", min_distance=None):
    B, T = loss.shape
    out = np.zeros((B, T), dtype=bool)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        sign = -1 if mode == "high" else 1
        order = sorted(valid, key=lambda t: (sign * loss[b, t], t))  # ties -> earlier position
        k = k_ref(len(valid), fraction, count)
        taken = []
        for t in order:
            if len(taken) == k:
                break
            if min_distance is None or all(abs(t - u) >= min_distance for u in taken):
                taken.append(t)
        out[b, taken] = True
    return out


def rand_loss(seed, B=4, T=30, ties=False):
    g = np.random.default_rng(seed)
    loss = g.random((B, T))
    if ties:
        loss = np.round(loss * 4) / 4
    mask = g.random((B, T)) < 0.6
    mask[0] = False  # an empty sequence
    return loss, mask


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
@pytest.mark.parametrize("mode", ["high", "low"])
@pytest.mark.parametrize("kw", [dict(fraction=0.0225), dict(fraction=0.3), dict(count=5), dict(count=100),
                                dict(fraction=0.4, min_distance=3)])
def test_select_candidates_matches_reference(seed, ties, mode, kw):
    loss, mask = rand_loss(seed, ties=ties)
    out = D.select_candidates(torch.tensor(loss), torch.tensor(mask), mode=mode, **kw)
    assert out.dtype == torch.bool
    assert np.array_equal(out.numpy(), select_ref(loss, mask, mode=mode, **kw))


def test_select_candidates_paper_fraction_and_masked_values():
    # paper: m ~ 218 of N ~ 9688 (fraction 0.0225) per trajectory
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 9688, generator=g)
    mask = torch.ones(2, 9688, dtype=torch.bool)
    mask[1, 5000:] = False
    loss[~mask] = 1e9  # huge loss at masked positions must never be picked
    out = D.select_candidates(loss, mask, fraction=218 / 9688)
    assert out.sum(1).tolist() == [218, math.floor(5000 * 218 / 9688 + 0.5)]
    assert not (out & ~mask).any()
    # at least one candidate when fraction > 0 and the sequence has a token
    one = torch.zeros(1, 10, dtype=torch.bool)
    one[0, 7] = True
    assert D.select_candidates(torch.rand(1, 10), one, fraction=0.01).nonzero().tolist() == [[0, 7]]
    assert D.select_candidates(torch.rand(1, 10), one, fraction=0.0).sum() == 0


def test_select_candidates_random_mode():
    loss, mask = rand_loss(3)
    lt, mt = torch.tensor(loss), torch.tensor(mask)
    a = D.select_candidates(lt, mt, count=4, mode="random", generator=torch.Generator().manual_seed(1))
    b = D.select_candidates(lt, mt, count=4, mode="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not (a & ~mt).any()
    assert a.sum(1).tolist() == [min(4, int(n)) for n in mt.sum(1)]
    # uniform over valid positions: each valid position of one row is hit ~ k/n of the time
    row = torch.ones(1, 10, dtype=torch.bool)
    gen = torch.Generator().manual_seed(2)
    hits = sum(D.select_candidates(torch.zeros(1, 10), row, count=3, mode="random", generator=gen).double()
               for _ in range(600))
    assert torch.all((hits / 600 - 0.3).abs() < 0.09)


def test_candidate_indices_order():
    c = torch.tensor([[False, True, True], [True, False, False]])
    b, p = D.candidate_indices(c)
    assert b.tolist() == [0, 0, 1] and p.tolist() == [1, 2, 0]


def test_select_candidates_errors():
    x, m = torch.rand(1, 4), torch.ones(1, 4)
    with pytest.raises(ValueError, match="fraction"):
        D.select_candidates(x, m)
    with pytest.raises(ValueError, match="mode"):
        D.select_candidates(x, m, count=1, mode="top")


# ----------------------------------------------------------------- labelling

@settings(max_examples=40, deadline=None)
@given(d=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40), q=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_quantile_labels_are_the_bottom_q(d, q):
    dt = torch.tensor(d, dtype=torch.float64)
    fa = D.label_false_alarms(dt, method="quantile", q=q)
    n = math.floor(q * len(d) + 0.5)
    assert int(fa.sum()) == n
    ref = sorted(range(len(d)), key=lambda i: (d[i], i))[:n]  # ties -> earlier index
    assert sorted(fa.nonzero().flatten().tolist()) == sorted(ref)
    if 0 < n < len(d):
        assert dt[fa].max() <= dt[~fa].min()


def test_threshold_and_low_loss_range():
    g = np.random.default_rng(4)
    d = g.random(50)
    low = g.random(37) * 0.6
    fa = D.label_false_alarms(torch.tensor(d), method="threshold", threshold=0.4)
    assert np.array_equal(fa.numpy(), d <= 0.4)
    q3 = np.percentile(low, 75)  # numpy linear interpolation
    d = np.append(d, [q3, q3 * (1 - 1e-9), q3 * (1 + 1e-9)])  # the boundary itself is inside the range
    fa = D.label_false_alarms(torch.tensor(d), method="low_loss_range", low_loss_d_ot=torch.tensor(low))
    assert np.array_equal(fa.numpy(), d <= q3)
    with pytest.raises(ValueError, match="low_loss_d_ot"):
        D.label_false_alarms(torch.tensor(d), method="low_loss_range")
    with pytest.raises(ValueError, match="threshold"):
        D.label_false_alarms(torch.tensor(d), method="threshold")
    with pytest.raises(ValueError, match="d_ot"):
        D.label_false_alarms(torch.tensor([0.1, float("nan")]))


@pytest.mark.parametrize("seed", range(3))
def test_matched_high_ot(seed):
    g = np.random.default_rng(seed)
    d = torch.tensor(g.random(int(g.integers(10, 60))))
    fa = D.label_false_alarms(d, q=0.3)
    n = int(fa.sum())
    ctrl = D.matched_high_ot(d, n, q=0.3, generator=torch.Generator().manual_seed(seed))
    assert int(ctrl.sum()) == n
    assert not (ctrl & fa).any()  # drawn from the complement of the bottom-30% set only
    assert d[ctrl].min() >= d[fa].max()
    again = D.matched_high_ot(d, n, q=0.3, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ctrl, again)
    with pytest.raises(ValueError, match="n_marked"):
        D.matched_high_ot(d, int((~fa).sum()) + 1, q=0.3)


def test_matched_high_ot_is_uniform_over_region():
    d = torch.arange(10, dtype=torch.float64)  # bottom 3 = {0,1,2}; region {3..9}
    gen = torch.Generator().manual_seed(0)
    hits = sum(D.matched_high_ot(d, 2, generator=gen).double() for _ in range(700))
    assert torch.all(hits[:3] == 0)
    assert torch.all((hits[3:] / 700 - 2 / 7).abs() < 0.07)


# ----------------------------------------------------------------- median capping

@pytest.mark.parametrize("seed", range(4))
def test_cap_at_median_values_and_gradient(seed):
    g = np.random.default_rng(seed)
    B, T = 3, 9
    loss = g.random((B, T)) * 3
    mask = g.random((B, T)) < 0.7
    mask[0, :2] = True
    mask[2] = False  # empty sequence
    marked = (g.random((B, T)) < 0.4) & mask
    x = torch.tensor(loss, requires_grad=True)
    out = D.cap_at_median(x, torch.tensor(mask), torch.tensor(marked))
    (grad,) = torch.autograd.grad(out.sum(), x)
    for b in range(B):
        med = np.median(loss[b][mask[b]]) if mask[b].any() else 0.0
        assert math.isclose(float(D.sequence_median(x, torch.tensor(mask))[b]), med, rel_tol=1e-12)
        for t in range(T):
            if not mask[b, t]:
                expect_v, expect_g = 0.0, 0.0
            elif marked[b, t] and loss[b, t] > med:
                expect_v, expect_g = med, med / loss[b, t]  # capped, gradient scaled, same sign
            else:
                expect_v, expect_g = loss[b, t], 1.0
            assert math.isclose(out[b, t].item(), expect_v, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(grad[b, t].item(), expect_g, rel_tol=1e-12, abs_tol=1e-15)


def test_cap_at_median_negative_median_and_inf():
    loss = torch.tensor([[-2.0, -1.0, -3.0, 4.0, math.inf]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    marked = torch.tensor([[False, False, False, True, True]])
    out = D.cap_at_median(loss, mask, marked)  # median = -1: positive marked loss dropped, not sign-flipped
    (g,) = torch.autograd.grad(out[0, 3], loss)
    assert out[0, 3].item() == 0.0 and g[0, 3].item() == 0.0
    assert out[0, 4].item() == -1.0  # inf loss -> the median, no nan
    assert torch.equal(out[0, :3], loss[0, :3])
    scale = D.median_cap_scale(loss, mask, marked)
    assert not scale.requires_grad and scale[0, :3].tolist() == [1.0, 1.0, 1.0]

# No gradcheck for cap_at_median on purpose: its gradient is scale * d(loss) with the scale held
# constant (a documented choice), not the derivative of its value (which also moves with the median);
# test_cap_at_median_values_and_gradient asserts that gradient exactly.
