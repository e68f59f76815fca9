"""topd_ds.loss.losses against float64 brute-force references written here (numpy loops, dense one-hots).

Covers: values on random shapes / masks / extreme logits / -inf teacher vocab / top-k ties,
gradcheck of every loss, chunked == unchunked (values and grads), the sampled-token policy-gradient
identity, and a deterministic memory test (bytes saved for backward) for the chunked full-vocab loss.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_ds.loss import losses as L

F64 = torch.float64


def gradcheck(fn, inputs):
    """torch.autograd.gradcheck in fast mode (random-projection Jacobian check; much cheaper on CPU)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------- references (numpy, loops)

def np_logsoftmax(x):
    x = np.asarray(x, dtype=np.float64)
    mx = np.max(x)
    if mx == -np.inf:
        return np.full_like(x, -np.inf)
    return x - (mx + math.log(np.sum(np.exp(x - mx))))


def np_kl(lp, lq):
    """KL(p||q) from log-probs with 0 log 0 = 0, by an explicit loop."""
    total = 0.0
    for a, b in zip(lp, lq):
        if a == -np.inf:
            continue
        total += math.exp(a) * (a - b)
    return total


def per_token_ref(fn, mask, *arrays):
    B, T = mask.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = fn(*[a[b, t] for a in arrays])
    return out


def rand_case(seed, *, scale=1.0, min_v=2):
    g = np.random.default_rng(seed)
    B, T, V = g.integers(1, 4), g.integers(1, 7), g.integers(min_v, 12)
    s = torch.tensor(g.standard_normal((B, T, V)) * scale, dtype=F64)
    t = torch.tensor(g.standard_normal((B, T, V)) * scale, dtype=F64)
    mask = torch.tensor(g.random((B, T)) < 0.7)
    return g, s, t, mask


def grads_of(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    w = torch.linspace(0.3, 1.7, out.numel(), dtype=F64).reshape(out.shape)  # non-uniform upstream grad
    return out.detach(), torch.autograd.grad((out * w).sum(), xs)


def assert_close(a, b, rtol=1e-9, atol=1e-10):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.allclose(a, b, rtol=rtol, atol=atol), np.max(np.abs(a - b))


# ----------------------------------------------------------------- reduce_loss

@pytest.mark.parametrize("seed", range(3))
def test_reduce_loss_matches_loops(seed):
    g = np.random.default_rng(seed)
    B, T = 4, 6
    x = g.standard_normal((B, T))
    m = g.random((B, T)) < 0.5
    m[0] = False  # an empty sequence
    m[1, 0] = True
    xt, mt = torch.tensor(x), torch.tensor(m)
    xt_bad = xt.clone()
    xt_bad[~mt] = float("nan")  # masked garbage must not leak
    tok = sum(x[b, t] for b in range(B) for t in range(T) if m[b, t]) / m.sum()
    seqs = [np.mean([x[b, t] for t in range(T) if m[b, t]]) for b in range(B) if m[b].any()]
    assert math.isclose(L.reduce_loss(xt_bad, mt, reduction="token").item(), tok, rel_tol=1e-12)
    assert math.isclose(L.reduce_loss(xt_bad, mt.double(), reduction="sequence").item(), np.mean(seqs), rel_tol=1e-12)
    assert math.isclose(L.reduce_loss(xt_bad, mt, reduction="batch").item(), x[m].sum() / (B * T), rel_tol=1e-12)
    assert math.isclose(L.reduce_loss(xt_bad, mt, reduction="batch", normalizer=7.0).item(), x[m].sum() / 7, rel_tol=1e-12)


def test_reduce_loss_all_masked_is_zero_with_zero_grad():
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    for red in L.REDUCTIONS:
        out = L.reduce_loss(x, torch.zeros(2, 3, dtype=torch.bool), reduction=red)
        (g,) = torch.autograd.grad(out, x)
        assert out.item() == 0.0 and torch.all(g == 0)
    with pytest.raises(ValueError, match="reduction"):
        L.reduce_loss(x, torch.ones(2, 3), reduction="mean")


# ----------------------------------------------------------------- reverse KL, full vocab

@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1.0), (2, 30.0), (3, 1e4), (4, 1e4)])
def test_reverse_kl_full_matches_reference(seed, scale):
    _, s, t, mask = rand_case(seed, scale=scale)
    ref = per_token_ref(lambda a, b: np_kl(np_logsoftmax(a), np_logsoftmax(b)), mask.numpy(), s.numpy(), t.numpy())
    for cs in (None, 1, 4, 1024):
        out = L.reverse_kl_full(s, t, mask, chunk_size=cs)
        assert_close(out, ref, rtol=1e-9, atol=1e-9 * scale)
        assert torch.all(out[~mask] == 0)


def test_reverse_kl_full_neg_inf_vocab():
    _, s, t, mask = rand_case(5, min_v=5)
    V = s.shape[-1]
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[1, V - 1]] = True
    s = s.masked_fill(banned, -math.inf)
    t = t.masked_fill(banned, -math.inf)
    keep = (~banned).numpy()
    ref = per_token_ref(lambda a, b: np_kl(np_logsoftmax(a[keep]), np_logsoftmax(b[keep])), mask.numpy(),
                        s.numpy(), t.numpy())
    val, (gs,) = grads_of(lambda x: L.reverse_kl_full(x, t, mask, chunk_size=2), s)
    assert_close(val, ref)
    assert torch.isfinite(gs).all() and torch.all(gs[..., banned] == 0)
    # teacher -inf where the student has mass: the true value, +inf
    t2 = t.clone()
    t2[..., 0] = -math.inf
    s2 = s.masked_fill(banned, 0.0)
    out = L.reverse_kl_full(s2, t2, mask)
    assert torch.all(torch.isinf(out[mask])) and torch.all(out[~mask] == 0)


@pytest.mark.parametrize("seed", range(3))
def test_reverse_kl_chunked_equals_unchunked_values_and_grads(seed):
    _, s, t, mask = rand_case(10 + seed)
    ref_v, ref_g = grads_of(lambda a, b: L.reverse_kl_full(a, b, mask, chunk_size=None), s, t)
    for cs in (1, 2, 5):
        v, g = grads_of(lambda a, b: L.reverse_kl_full(a, b, mask, chunk_size=cs), s, t)
        assert_close(v, ref_v, rtol=1e-12, atol=1e-14)
        for x, y in zip(g, ref_g):
            assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_reverse_kl_hidden_forms_match_logits_form():
    g = np.random.default_rng(7)
    B, T, V, Hs, Ht = 2, 5, 9, 3, 4
    hs, ht = torch.tensor(g.standard_normal((B, T, Hs))), torch.tensor(g.standard_normal((B, T, Ht)))
    ws, wt = torch.tensor(g.standard_normal((V, Hs))), torch.tensor(g.standard_normal((V, Ht)))
    mask = torch.tensor(g.random((B, T)) < 0.7)
    ref = L.reverse_kl_full(hs @ ws.T, ht @ wt.T, mask, chunk_size=None)
    # reference values from numpy loops, too
    refnp = per_token_ref(lambda a, b: np_kl(np_logsoftmax(ws.numpy() @ a), np_logsoftmax(wt.numpy() @ b)),
                          mask.numpy(), hs.numpy(), ht.numpy())
    assert_close(ref, refnp)
    for cs in (None, 1, 3):
        v1, g1 = grads_of(lambda a, h, w: L.reverse_kl_from_hidden(a, h, w, mask, chunk_size=cs), hs @ ws.T, ht, wt)
        v0, g0 = grads_of(lambda a, h, w: L.reverse_kl_full(a, h @ w.T, mask, chunk_size=None), hs @ ws.T, ht, wt)
        assert_close(v1, v0, rtol=1e-12)
        for x, y in zip(g1, g0):
            assert_close(x, y, rtol=1e-10, atol=1e-12)
        v2, g2 = grads_of(lambda a, b, c, d: L.reverse_kl_hidden_both(a, b, c, d, mask, chunk_size=cs), hs, ws, ht, wt)
        v3, g3 = grads_of(lambda a, b, c, d: L.reverse_kl_full(a @ b.T, c @ d.T, mask, chunk_size=None), hs, ws, ht, wt)
        assert_close(v2, v3, rtol=1e-12)
        for x, y in zip(g2, g3):
            assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradcheck_reverse_kl_forms():
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 3, 5, 3
    s, t = torch.randn(B, T, V, generator=g, dtype=F64), torch.randn(B, T, V, generator=g, dtype=F64)
    hs, ht = torch.randn(B, T, H, generator=g, dtype=F64), torch.randn(B, T, H, generator=g, dtype=F64)
    ws, wt = torch.randn(V, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    req = lambda *xs: tuple(x.clone().requires_grad_(True) for x in xs)  # noqa: E731
    assert gradcheck(lambda a, b: L.reverse_kl_full(a, b, mask, chunk_size=2), req(s, t))
    # one slow-mode (full Jacobian) check on the smallest case, for the chunked autograd.Function itself
    assert torch.autograd.gradcheck(lambda a, b: L.reverse_kl_full(a, b, mask[:1, :2], chunk_size=1),
                                    req(s[:1, :2, :3], t[:1, :2, :3]))
    assert gradcheck(lambda a, b: L.reverse_kl_full(a, b, mask, chunk_size=None), req(s, t))
    assert gradcheck(lambda a, h, w: L.reverse_kl_from_hidden(a, h, w, mask, chunk_size=2),
                                    req(s, ht, wt))
    assert gradcheck(lambda a, b, c, d: L.reverse_kl_hidden_both(a, b, c, d, mask, chunk_size=4),
                                    req(hs, ws, ht, wt))


# ----------------------------------------------------------------- forward KL + CE (stage 1)

def fkl_ce_ref(a, b, y, kd, tau):
    kl = np_kl(np_logsoftmax(b / tau), np_logsoftmax(a / tau)) * tau ** 2
    ce = -np_logsoftmax(a)[y]
    return kd * kl + (1 - kd) * ce


@pytest.mark.parametrize("seed,scale,kd,tau", [(0, 1.0, 0.5, 1.0), (1, 3.0, 0.3, 2.0), (2, 1e4, 0.5, 1.0),
                                               (3, 1.0, 1.0, 0.7), (4, 1.0, 0.0, 1.0)])
def test_forward_kl_ce_matches_reference(seed, scale, kd, tau):
    g, s, t, mask = rand_case(seed, scale=scale)
    y = torch.tensor(g.integers(0, s.shape[-1], mask.shape))
    y_bad = y.masked_fill(~mask, -100)  # ignore-index style targets at masked positions must be fine
    ref = per_token_ref(lambda a, b, yy: fkl_ce_ref(a, b, yy, kd, tau), mask.numpy(), s.numpy(), t.numpy(), y.numpy())
    for cs in (None, 2):
        out = L.forward_kl_ce(s, t if kd > 0 else None, y_bad, mask, kd_ratio=kd, temperature=tau, chunk_size=cs)
        assert_close(out, ref, rtol=1e-9, atol=1e-9 * scale)


def test_forward_kl_neg_inf_teacher_vocab_is_finite():
    g, s, t, mask = rand_case(8, min_v=4)
    t[..., 0] = -math.inf  # teacher masks token 0; student does not
    y = torch.tensor(g.integers(1, s.shape[-1], mask.shape))
    ref = per_token_ref(lambda a, b, yy: fkl_ce_ref(a, b, yy, 0.5, 1.5), mask.numpy(), s.numpy(), t.numpy(), y.numpy())
    val, (gs,) = grads_of(lambda x: L.forward_kl_ce(x, t, y, mask, temperature=1.5, chunk_size=3), s)
    assert_close(val, ref)
    assert torch.isfinite(gs).all()


def test_forward_kl_ce_topk_teacher():
    g, s, t, mask = rand_case(9, min_v=6)
    k = 3
    ids = torch.tensor(np.stack([[g.permutation(s.shape[-1])[:k] for _ in range(s.shape[1])]
                                 for _ in range(s.shape[0])]))
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    y = torch.tensor(g.integers(0, s.shape[-1], mask.shape))
    tau, kd = 1.3, 0.6

    def ref(a, ii, ll, yy):
        lt = np_logsoftmax(ll / tau)
        ls = np_logsoftmax(a / tau)[ii]
        return kd * tau ** 2 * np_kl(lt, ls) + (1 - kd) * -np_logsoftmax(a)[yy]

    r = per_token_ref(ref, mask.numpy(), s.numpy(), ids.numpy(), lp.numpy(), y.numpy())
    kw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp, kd_ratio=kd, temperature=tau)
    assert_close(L.forward_kl_ce(s, None, y, mask, chunk_size=None, **kw), r)
    v1, g1 = grads_of(lambda x: L.forward_kl_ce(x, None, y, mask, chunk_size=2, **kw), s)
    v0, g0 = grads_of(lambda x: L.forward_kl_ce(x, None, y, mask, chunk_size=None, **kw), s)
    assert_close(v1, v0, rtol=1e-12)
    assert_close(g1[0], g0[0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="teacher_logits"):
        L.forward_kl_ce(s, t, y, mask, **kw)


def test_gradcheck_forward_kl_ce():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert gradcheck(
        lambda a, b: L.forward_kl_ce(a, b, y, mask, kd_ratio=0.4, temperature=1.7, chunk_size=2), (s, t))
    ids = torch.tensor([[[0, 2], [1, 4], [3, 0]], [[2, 1], [4, 3], [0, 1]]])
    lp = torch.log_softmax(t.detach(), -1).gather(-1, ids).requires_grad_(True)
    assert gradcheck(
        lambda a, b: L.forward_kl_ce(a, None, y, mask, teacher_topk_ids=ids, teacher_topk_logprobs=b,
                                     temperature=0.8, chunk_size=1), (s, lp))


# ----------------------------------------------------------------- reverse KL, teacher top-k

def topk_ref(a, ids, lt, tail, floor=1e-6):
    ls = np_logsoftmax(a)[ids]
    if not tail:
        return np_kl(np_logsoftmax(ls), np_logsoftmax(lt))
    ps, pt = np.exp(ls), np.exp(lt)
    tail_s = max(1 - ps.sum(), floor)
    tail_t = max(1 - pt.sum(), floor)
    return np_kl(np.append(ls, math.log(tail_s)), np.append(lt, math.log(tail_t)))


def stable_topk_ids(logits, k):
    """Top-k ids by a stable brute sort (ties -> smaller id), per row."""
    B, T, V = logits.shape
    out = np.zeros((B, T, k), dtype=np.int64)
    for b in range(B):
        for t in range(T):
            out[b, t] = sorted(range(V), key=lambda v: (-logits[b, t, v], v))[:k]
    return torch.tensor(out)


@pytest.mark.parametrize("seed,scale,tail", [(0, 1.0, True), (1, 1.0, False), (2, 1e4, True), (3, 1e4, False),
                                             (4, 5.0, True)])
def test_reverse_kl_topk_matches_reference(seed, scale, tail):
    g, s, t, mask = rand_case(seed, scale=scale, min_v=5)
    t = torch.round(t * 2) / 2  # ties in the teacher's values
    k = int(g.integers(1, s.shape[-1] - 1))
    ids = stable_topk_ids(t.numpy(), k)
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    r = per_token_ref(lambda a, ii, ll: topk_ref(a, ii, ll, tail), mask.numpy(), s.numpy(), ids.numpy(), lp.numpy())
    for cs in (None, 2):
        out = L.reverse_kl_topk(s, ids, lp, mask, tail_bucket=tail, chunk_size=cs)
        assert_close(out, r, rtol=1e-8, atol=1e-8 * scale)
    v1, g1 = grads_of(lambda x: L.reverse_kl_topk(x, ids, lp, mask, tail_bucket=tail, chunk_size=2), s)
    v0, g0 = grads_of(lambda x: L.reverse_kl_topk(x, ids, lp, mask, tail_bucket=tail, chunk_size=None), s)
    assert torch.isfinite(g1[0]).all()
    assert_close(g1[0], g0[0], rtol=1e-12, atol=1e-14)


def test_reverse_kl_topk_full_mass_and_padding():
    # teacher's top-k holds all its mass (tail 0) and the student's too: floors keep it finite
    s = torch.tensor([[[5.0, 4.0, -math.inf, -math.inf]]], dtype=F64, requires_grad=True)
    ids = torch.tensor([[[0, 1]]])
    lp = torch.log_softmax(torch.tensor([[[3.0, 3.0]]], dtype=F64), -1)
    out = L.reverse_kl_topk(s, ids, lp, torch.ones(1, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert math.isclose(out.item(), topk_ref(s.detach().numpy()[0, 0], [0, 1], lp.numpy()[0, 0], True), rel_tol=1e-9)


@pytest.mark.parametrize("tail", [True, False])
def test_reverse_kl_topk_padding_slots_are_ignored(tail):
    """Rows with fewer than k teacher ids are padded with id 0 (a duplicate) and logprob -inf."""
    g, s, t, mask = rand_case(12, min_v=6)
    ids = stable_topk_ids(t.numpy(), 3)
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    pad_ids = torch.cat([ids, torch.zeros_like(ids[..., :2])], -1)  # (B, T, 5)
    pad_lp = torch.cat([lp, torch.full_like(lp[..., :2], -math.inf)], -1)
    v1, g1 = grads_of(lambda x: L.reverse_kl_topk(x, pad_ids, pad_lp, mask, tail_bucket=tail, chunk_size=2), s)
    v0, g0 = grads_of(lambda x: L.reverse_kl_topk(x, ids, lp, mask, tail_bucket=tail, chunk_size=None), s)
    assert_close(v1, v0, rtol=1e-12, atol=1e-14)
    assert_close(g1[0], g0[0], rtol=1e-12, atol=1e-14)


def test_gradcheck_reverse_kl_topk():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 6, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=g, dtype=F64)
    ids = t.topk(3, -1).indices
    lp = torch.log_softmax(t, -1).gather(-1, ids).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for tail in (True, False):
        assert gradcheck(
            lambda a, b: L.reverse_kl_topk(a, ids, b, mask, tail_bucket=tail, chunk_size=2), (s, lp))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_topk_with_tail_lower_bounds_full_reverse_kl(seed, k):
    """Coarsening the vocabulary to (top-k ids + one tail) can only lower the KL (data processing)."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(1, 4, 8, generator=g, dtype=F64) * 3, torch.randn(1, 4, 8, generator=g, dtype=F64) * 3
    mask = torch.ones(1, 4, dtype=torch.bool)
    ids = t.topk(k, -1).indices
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    full = L.reverse_kl_full(s, t, mask)
    part = L.reverse_kl_topk(s, ids, lp, mask, tail_bucket=True, tail_floor=1e-12)
    assert torch.all(part <= full + 1e-9)


# ----------------------------------------------------------------- sampled-token estimator

def test_sampled_estimator_and_pg_gradient_are_exact_in_expectation():
    """Enumerate x over the vocabulary: E_{x~p_S}[estimate] = KL and E[grad pg loss] = grad KL."""
    g = torch.Generator().manual_seed(3)
    V = 7
    theta = torch.randn(V, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(V, generator=g, dtype=F64)
    lp_t = torch.log_softmax(t, -1)
    lp_s = torch.log_softmax(theta, -1)
    p = lp_s.exp().detach()
    x = torch.arange(V)[None, :]  # (1, V): every token as one "sampled" position
    mask = torch.ones(1, V, dtype=torch.bool)
    est = L.reverse_kl_sampled(lp_s[x], lp_t[x], mask)  # (1, V)
    kl_exact = L.reverse_kl_full(theta[None, None], t[None, None], torch.ones(1, 1, dtype=torch.bool)).sum()
    assert math.isclose((p * est[0]).sum().item(), kl_exact.item(), rel_tol=1e-12)
    pg = L.sampled_token_pg_loss(lp_s[x], -est.detach(), mask)  # (1, V)
    (g_pg,) = torch.autograd.grad((p * pg[0]).sum(), theta)  # expectation over x of the per-sample gradient
    (g_kl,) = torch.autograd.grad(kl_exact, theta)
    assert torch.allclose(g_pg, g_kl, rtol=1e-10, atol=1e-12)
    assert torch.all(L.reverse_kl_sampled(lp_s[x], lp_t[x], torch.zeros(1, V)) == 0)


def test_gradcheck_pg_loss():
    lp = torch.randn(2, 4, dtype=F64, requires_grad=True)
    adv = torch.randn(2, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    assert gradcheck(lambda a: L.sampled_token_pg_loss(a, adv, mask), (lp,))


# ----------------------------------------------------------------- trajectory loss

def soft_targets_ref(plan, tm, sm):
    M, Kt, Ks = plan.shape
    w = np.zeros((M, Ks, Kt))
    for m in range(M):
        for j in range(Ks):
            if not sm[m, j]:
                continue
            col = [plan[m, i, j] if tm[m, i] else 0.0 for i in range(Kt)]
            tot = sum(col)
            if tot > 0:
                w[m, j] = np.array(col) / tot
    return w


def traj_ref(logits, w, ids, sm, V):
    """Dense one-hot reference: per window sum_j KL(y_j || softmax(logits_j))."""
    M, Ks, Kt = w.shape
    per_window = np.zeros(M)
    for m in range(M):
        for j in range(Ks):
            if not sm[m, j] or w[m, j].sum() == 0:
                continue
            y = np.zeros(V)
            for i in range(Kt):
                y[ids[m, i]] += w[m, j, i]  # dense one-hot sum, duplicates add up
            per_window[m] += np_kl(np.log(np.where(y > 0, y, 1.0)) + np.where(y > 0, 0, -np.inf),
                                   np_logsoftmax(logits[m, j]))
    return per_window


def traj_case(seed):
    g = np.random.default_rng(seed)
    M, Kt, Ks, V = int(g.integers(1, 4)), int(g.integers(2, 6)), int(g.integers(2, 6)), 6
    plan = g.random((M, Kt, Ks)) * (g.random((M, Kt, Ks)) < 0.7)
    ids = g.integers(0, 3, (M, Kt))  # small id range: many duplicates
    tm = g.random((M, Kt)) < 0.8
    sm = g.random((M, Ks)) < 0.8
    ids_padded = np.where(tm, ids, -1)  # masked teacher slots padded with -1
    logits = g.standard_normal((M, Ks, V)) * 3
    return plan, ids, ids_padded, tm, sm, logits, V


@pytest.mark.parametrize("seed", range(4))
def test_trajectory_matches_dense_reference(seed):
    plan, ids, ids_pad, tm, sm, logits, V = traj_case(seed)
    w = L.trajectory_soft_targets(torch.tensor(plan), torch.tensor(ids_pad), torch.tensor(tm), torch.tensor(sm))
    w_ref = soft_targets_ref(plan, tm, sm)
    assert_close(w, w_ref, rtol=1e-12, atol=1e-15)
    ref = traj_ref(logits, w_ref, ids, sm, V)
    lt = torch.tensor(logits)
    for cs in (None, 1, 3):
        per = L.trajectory_loss(lt, w, torch.tensor(ids_pad), torch.tensor(sm), reduction="none", chunk_size=cs)
        assert_close(per, ref, rtol=1e-9, atol=1e-12)
        assert torch.all(per >= -1e-12)
    n_win = max(1, int((np.asarray(w_ref).sum(-1) > 0).any(-1).sum()))
    assert math.isclose(L.trajectory_loss(lt, w, torch.tensor(ids_pad), torch.tensor(sm), reduction="sum").item(),
                        ref.sum(), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(L.trajectory_loss(lt, w, torch.tensor(ids_pad), torch.tensor(sm)).item(),
                        ref.sum() / n_win, rel_tol=1e-9, abs_tol=1e-12)


def test_trajectory_hidden_form_chunked_grads_and_gradcheck():
    plan, ids, ids_pad, tm, sm, _, V = traj_case(11)
    g = torch.Generator().manual_seed(4)
    M, Ks = sm.shape
    h = torch.randn(M, Ks, 3, generator=g, dtype=F64)
    wh = torch.randn(V, 3, generator=g, dtype=F64)
    w = L.trajectory_soft_targets(torch.tensor(plan), torch.tensor(ids_pad), torch.tensor(tm), torch.tensor(sm))
    idt, smt = torch.tensor(ids_pad), torch.tensor(sm)
    v1, g1 = grads_of(lambda a, b: L.trajectory_loss_from_hidden(a, b, w, idt, smt, reduction="none", chunk_size=2), h, wh)
    v0, g0 = grads_of(lambda a, b: L.trajectory_loss(a @ b.T, w, idt, smt, reduction="none", chunk_size=None), h, wh)
    assert_close(v1, v0, rtol=1e-12)
    for x, y in zip(g1, g0):
        assert_close(x, y, rtol=1e-10, atol=1e-12)
    s = (h @ wh.T).requires_grad_(True)
    assert gradcheck(lambda a: L.trajectory_loss(a, w, idt, smt, chunk_size=2), (s,))
    assert gradcheck(lambda a, b: L.trajectory_loss_from_hidden(a, b, w, idt, smt, chunk_size=3),
                                    (h.clone().requires_grad_(True), wh.clone().requires_grad_(True)))


def test_trajectory_empty_and_topd():
    w = torch.zeros(2, 3, 4, dtype=F64)
    s = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    out = L.trajectory_loss(s, w, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    (g,) = torch.autograd.grad(out, s)
    assert out.item() == 0.0 and torch.all(g == 0)
    assert L.topd_loss(torch.tensor(2.0), torch.tensor(3.0), lam=0.5).item() == 3.5
    with pytest.raises(ValueError, match="reduction"):
        L.trajectory_loss(s, w, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3), reduction="token")


# ----------------------------------------------------------------- memory: saved-for-backward bytes

def saved_extra_bytes(fn, inputs):
    """Bytes of tensors saved for backward that do NOT share storage with the inputs (the extra memory
    the graph keeps alive between forward and backward). Deterministic, unlike RSS."""
    input_ptrs = {x.untyped_storage().data_ptr() for x in inputs}
    seen, total = set(), 0

    def pack(x):
        nonlocal total
        ptr = x.untyped_storage().data_ptr()
        if ptr not in input_ptrs and ptr not in seen:
            seen.add(ptr)
            total += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn(*inputs)
    out.sum().backward()  # the graph is usable
    return total


def test_chunked_full_vocab_memory_is_flat_in_length():
    V, H, cs = 1024, 8, 16
    g = torch.Generator().manual_seed(5)
    ws, wt = torch.randn(V, H, generator=g, requires_grad=True), torch.randn(V, H, generator=g)
    extra = {}
    for chunked in (True, False):
        for T in (16, 64):
            hs = torch.randn(1, T, H, generator=g, requires_grad=True)
            ht = torch.randn(1, T, H, generator=g)
            mask = torch.ones(1, T, dtype=torch.bool)
            fn = lambda a, b, c, d: L.reverse_kl_hidden_both(  # noqa: E731
                a, b, c, d, mask, chunk_size=cs if chunked else None)
            extra[chunked, T] = saved_extra_bytes(fn, [hs, ws, ht, wt])
    growth_chunked = (extra[True, 64] - extra[True, 16]) / 48  # bytes per extra token
    growth_plain = (extra[False, 64] - extra[False, 16]) / 48
    assert growth_plain >= 2 * V * 4  # unchunked keeps >= two fp32 (T, V) tensors: the problem
    assert growth_chunked <= 64  # chunked: a few int64/fp32 scalars per token (indices), no V
    assert extra[True, 64] < V * 4  # less than ONE vocab row in total


RSS_SCRIPT = r"""
import torch
from topd_ds.loss import losses as L
V, H, CS = 2048, 8, 32
def step(T, chunked):
    g = torch.Generator().manual_seed(T)
    hs = torch.randn(1, T, H, generator=g, requires_grad=True); ht = torch.randn(1, T, H, generator=g)
    ws = torch.randn(V, H, generator=g, requires_grad=True); wt = torch.randn(V, H, generator=g)
    out = L.reverse_kl_hidden_both(hs, ws, ht, wt, torch.ones(1, T, dtype=torch.bool),
                                   chunk_size=CS if chunked else None)
    out.sum().backward()
def rss():
    # VmHWM: this process's peak RSS. Not ru_maxrss, which after fork + exec starts at the parent's RSS.
    line = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
    return int(line.split()[1]) * 1024  # kB
step(64, True); r0 = rss(); step(512, True); r1 = rss()
step(64, False); r2 = rss(); step(512, False); r3 = rss()
print(r1 - r0, r3 - r2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and the malloc env are Linux-specific")
def test_chunked_full_vocab_peak_rss_is_flat_in_length():
    """Peak RSS (forward + backward) in a fresh process: growing T from 64 to 512 at V = 2048 must not
    raise the chunked loss's peak, while the unchunked one grows by several (T, V) fp32 tensors.
    MALLOC_MMAP_THRESHOLD_ makes freed large buffers go back to the OS, so the peak is not hidden by
    heap fragmentation. This also catches (T, V) tensors kept on ctx, which saved_tensors_hooks miss."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    chunked_growth, plain_growth = map(int, res.stdout.split())
    one_tv = 512 * 2048 * 4  # one fp32 (T, V) tensor at T = 512: 4 MiB
    assert plain_growth > 2 * one_tv  # the measurement sees the problem ...
    assert chunked_growth < one_tv // 4  # ... and the chunked loss does not have it
