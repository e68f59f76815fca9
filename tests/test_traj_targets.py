"""topd_ds.loss.traj_targets: the trajectory term's targets checked against the deque checker and the two options
beside the paper's form, each against float64 brute force (python loops over the definitions)."""

import itertools
import math
import os
import random

import pytest
import torch

from topd_ds.loss import losses, traj_targets as tt
from topd_ds.rollout.batch import Windows
from topd_ds.tasks import deque

SEED = 2512
print(f"test_traj_targets: seed {SEED}")


def _random_windows(gen, M=7, K=6, V=4):
    """Small vocabulary so windows often agree for a while; random lengths (masks are prefixes)."""
    t_ids = torch.randint(0, V, (M, K), generator=gen)
    s_ids = torch.where(torch.rand(M, K, generator=gen) < 0.6, t_ids, torch.randint(0, V, (M, K), generator=gen))
    t_len = torch.randint(0, K + 1, (M,), generator=gen)
    s_len = torch.randint(0, K + 1, (M,), generator=gen)
    ar = torch.arange(K)
    return t_ids, ar[None] < t_len[:, None], s_ids, ar[None] < s_len[:, None]


def test_first_divergence_and_until_divergence_against_loops():
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(20):
        t_ids, t_mask, s_ids, s_mask = _random_windows(gen)
        M, K = t_ids.shape
        d = tt.first_divergence(t_ids, t_mask, s_ids, s_mask)
        for m in range(M):
            ref = K
            for j in range(K):
                tj = int(t_ids[m, j]) if t_mask[m, j] else None  # None: the window has ended
                sj = int(s_ids[m, j]) if s_mask[m, j] else None
                if tj != sj:
                    ref = j
                    break
            assert int(d[m]) == ref, (m, t_ids[m], t_mask[m], s_ids[m], s_mask[m])
        w = torch.rand(M, K, K, generator=gen, dtype=torch.float64)
        cut = tt.until_divergence(w, d)
        for m, j in itertools.product(range(M), range(K)):
            want = w[m, j] if j <= int(d[m]) else torch.zeros(K, dtype=torch.float64)
            assert torch.equal(cut[m, j], want)


def _per_window_kl_loop(logits, weights, t_ids, s_mask):
    """sum_j KL(y_j || p_S(. | c_j)) per window, y_j merged over duplicate teacher ids: float64 loops."""
    M, Ks, V = logits.shape
    out = []
    for m in range(M):
        total = 0.0
        for j in range(Ks):
            row = weights[m, j]
            if not s_mask[m, j] or float(row.sum()) == 0:
                continue
            y = [0.0] * V
            for i in range(weights.shape[2]):
                y[int(t_ids[m, i])] += float(row[i])
            logp = torch.log_softmax(logits[m, j], -1)
            total += sum(yv * (math.log(yv) - float(logp[v])) for v, yv in enumerate(y) if yv > 0)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("targets", tt.TARGETS)
@pytest.mark.parametrize("reduction", tt.REDUCTIONS)
def test_the_loss_under_each_option_equals_the_loop(targets, reduction):
    gen = torch.Generator().manual_seed(SEED + 1)
    M, K, V = 6, 5, 4
    t_ids, t_mask, s_ids, s_mask = _random_windows(gen, M=M, K=K, V=V)
    plan = torch.rand(M, K, K, generator=gen, dtype=torch.float64)
    win = Windows(torch.zeros(M, dtype=torch.long), torch.ones(M, dtype=torch.long), t_ids, t_mask, s_ids, s_mask,
                  plan, torch.zeros(M))
    w = tt.soft_targets(win, targets=targets)
    if targets == "paper":  # the paper's targets are losses.trajectory_soft_targets, unchanged
        assert torch.equal(w, losses.trajectory_soft_targets(plan, t_ids, t_mask, s_mask))
    logits = torch.randn(M, K, V, generator=gen, dtype=torch.float64)
    per = losses.trajectory_loss(logits, w, t_ids, s_mask, reduction="none", chunk_size=None)
    ref_per = _per_window_kl_loop(logits, w, t_ids, s_mask)
    assert torch.allclose(per, ref_per, atol=1e-12)
    valid = tt.target_positions(w, s_mask)
    got = tt.reduce_windows(per, valid, reduction=reduction)
    terms = []
    for m in range(M):
        n = sum(1 for j in range(K) if s_mask[m, j] and float(w[m, j].sum()) > 0)
        if n:
            terms.append(float(ref_per[m]) / (n if reduction == "mean" else 1))
    ref = sum(terms) / max(len(terms), 1)
    assert float(got) == pytest.approx(ref, abs=1e-12)
    if reduction == "sum":  # the paper's form is the old objective's reduction="mean" over windows
        assert float(got) == pytest.approx(float(losses.trajectory_loss(logits, w, t_ids, s_mask, reduction="mean",
                                                                        chunk_size=None)), abs=1e-12)


def test_mean_reduction_does_not_scale_with_k():
    # the same per-position KLs in windows twice as long: sum doubles, mean stays
    per_position = torch.tensor([[0.3, 0.1, 0.0, 0.2]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True]])
    one = tt.reduce_windows(per_position.sum(-1), valid, reduction="mean")
    two = tt.reduce_windows(per_position.repeat(1, 2).sum(-1), valid.repeat(1, 2), reduction="mean")
    assert float(one) == pytest.approx(0.2) and float(two) == pytest.approx(0.2)
    assert float(tt.reduce_windows(per_position.repeat(1, 2).sum(-1), valid.repeat(1, 2), reduction="sum")) == \
        pytest.approx(1.2)
    with pytest.raises(ValueError, match="traj_reduction"):
        tt.reduce_windows(per_position.sum(-1), valid, reduction="avg")


def test_invalid_target_mass_against_loops():
    gen = torch.Generator().manual_seed(SEED + 2)
    M, K = 9, 5
    w = torch.rand(M, K, K, generator=gen, dtype=torch.float64) * (torch.rand(M, K, 1, generator=gen) < 0.8)
    invalid = torch.rand(M, K, K, generator=gen) < 0.3
    labelled = torch.rand(M, K, generator=gen) < 0.7
    r = tt.invalid_target_mass(w, invalid, labelled)
    bad = tot = 0.0
    mostly = n = 0
    for m, j in itertools.product(range(M), range(K)):
        row = float(w[m, j].sum())
        if not labelled[m, j] or row == 0:
            continue
        b = sum(float(w[m, j, i]) for i in range(K) if invalid[m, j, i])
        bad, tot, n, mostly = bad + b, tot + row, n + 1, mostly + (b > 0.5 * row)
    assert r["positions"] == n and r["invalid_mass"] == pytest.approx(bad / tot, abs=1e-12)
    assert r["mostly_invalid"] == pytest.approx(mostly / n)
    assert math.isnan(tt.invalid_target_mass(w, invalid, torch.zeros(M, K, dtype=torch.bool))["invalid_mass"])


def _all_valid_responses(digits):
    return [deque.render(digits, "".join(e)) + deque.EOS for e in itertools.product("LR", repeat=len(digits))]


def _allowed_brute(digits, context):
    """What may follow `context`, from the full enumeration (independent of valid_next); None off every path."""
    nxt = {r[len(context)] if r[len(context):len(context) + len(deque.EOS)] != deque.EOS else deque.EOS
           for r in _all_valid_responses(digits) if r.startswith(context) and len(r) > len(context)}
    return nxt or None


def test_deque_invalid_against_enumeration():
    rng = random.Random(SEED)
    for _ in range(15):
        digits = "".join(rng.choice("123456789") for _ in range(rng.randint(3, 5)))
        prompt = "".join(t + d for t, d in zip(deque.TAGS, digits)) + "="
        responses = [deque.render(digits, "".join(rng.choice("LR") for _ in digits)) for _ in range(2)]
        cut = rng.randint(0, len(responses[0]) - 1)
        prefix = responses[0][:cut]
        # student: the rest of response 0 with, sometimes, one character mutated (its context then leaves)
        student = list(responses[0][cut:cut + 6])
        if rng.random() < 0.5 and student:
            student[rng.randrange(len(student))] = rng.choice("0123456789,:=ab")
        other = responses[1] if responses[1].startswith(prefix) else responses[0]
        teacher = list(other[cut:cut + 6])
        invalid, labelled = tt.deque_invalid(prompt, prefix, student, teacher)
        context = prefix
        for j in range(len(student)):
            allowed = _allowed_brute(digits, context)
            assert bool(labelled[j]) == (allowed is not None), (prompt, context)
            if allowed is None:
                assert not labelled[j:].any()
                break
            for i, c in enumerate(teacher):
                assert bool(invalid[j, i]) == (c not in allowed), (prompt, context, c)
            context += student[j]


def test_a_window_past_its_fork_puts_target_mass_on_invalid_tokens():
    # prompt a1b2c3: the student takes a (left), the teacher c (right); the identity plan maps position to
    # position. Up to the fork (j = 0) the targets are valid; after it the teacher's "3=3:ab" is invalid in the
    # student's context "a...", so "until_divergence" drops exactly the invalid part here.
    prompt, student, teacher = "a1b2c3=", list("a1=1:bc"), list("c3=3:ab")
    K = len(student)
    invalid, labelled = tt.deque_invalid(prompt, "", student, teacher)
    w = torch.eye(K, dtype=torch.float64)[None]
    paper = tt.invalid_target_mass(w, invalid[None], labelled[None])
    d = tt.first_divergence(torch.tensor([[ord(c) for c in teacher]]), torch.ones(1, K, dtype=torch.bool),
                            torch.tensor([[ord(c) for c in student]]), torch.ones(1, K, dtype=torch.bool))
    assert int(d) == 0
    cut = tt.invalid_target_mass(tt.until_divergence(w, d), invalid[None], labelled[None])
    # j=0: 'c' valid; j=1 '3' vs {'1'}: invalid; j=2 '=' valid; j=3 '3' vs {'1'}: invalid; j=4 ':' valid;
    # j=5 'a' vs {'b'}: invalid; j=6 'b' vs {'c'}: invalid -> 4 of 7 positions' mass invalid
    assert paper["invalid_mass"] == pytest.approx(4 / 7) and paper["mostly_invalid"] == pytest.approx(4 / 7)
    assert cut["invalid_mass"] == 0 and cut["positions"] == 1


def test_check_batch_targets_decodes_a_real_batch_with_the_deque_tokenizer():
    # the trainer's logging path: token ids -> characters -> checker, on the committed deque tokenizer
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "models", "deque", "tokenizer"))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompt, student, teacher = "a1b2c3=", "a1=1:bc", "c3=3:ab"
    seq = enc(prompt) + enc(student + ",b2=3:cc,c3=6") + [tok.eos_token_id]
    K = len(student)
    ids = lambda s: torch.tensor([enc(s)])  # noqa: E731
    win = Windows(torch.tensor([0]), torch.tensor([len(enc(prompt))]), ids(teacher), torch.ones(1, K, dtype=torch.bool),
                  ids(student), torch.ones(1, K, dtype=torch.bool), torch.eye(K)[None], torch.zeros(1))
    batch = SimpleNamespace(windows=win, sequences=[seq], prompt_lens=[len(enc(prompt))])
    got = tt.check_batch_targets(batch, tok, checker="deque")
    assert got["traj/invalid_target_mass"] == pytest.approx(4 / 7) and got["traj/labelled_positions"] == K
    assert tt.check_batch_targets(batch, tok, checker="deque", targets="until_divergence")[
        "traj/invalid_target_mass"] == 0
    assert tt.check_batch_targets(batch, tok, checker="none") == {}
