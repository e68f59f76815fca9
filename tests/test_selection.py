"""Selection scores on the training device, chunked over rows and vocabulary, pick the same candidates as
the CPU reference path (pipeline.teacher_logprobs_at over the whole vocabulary)."""

import pytest
import torch

from topd_ds.rollout import divergence
from topd_ds.rollout.pipeline import selection_score, stack_ragged, teacher_logprobs_at
from topd_ds.rollout.selection import teacher_logprobs_at_chunked


def random_scoring(seed, n_seq=4, V=1003, H=24, k=5):
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(V, H, generator=g) / H ** 0.5
    seqs = []
    for _ in range(n_seq):
        R = int(torch.randint(1, 400, (), generator=g))
        hidden = 3 * torch.randn(R, H, generator=g)
        s_logits = torch.randn(R, V, generator=g)
        s_lp, s_ids = torch.log_softmax(s_logits, -1).topk(k, -1)
        seqs.append((hidden, s_ids, s_lp))
    return head, seqs


def candidates(head, seqs, logprobs_at, fraction=0.05):
    scores = [selection_score(ids, lp, logprobs_at(h, head, ids)) for h, ids, lp in seqs]
    stacked, mask = stack_ragged(scores)
    return scores, divergence.select_candidates(stacked, mask, fraction=fraction, mode="high")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_scores_pick_the_same_candidates_as_the_reference(seed):
    head, seqs = random_scoring(seed)
    ref_scores, ref = candidates(head, seqs, teacher_logprobs_at)
    # tiles smaller than the data and not dividing it: 7 row chunks of 64, vocab chunks of 100 (last 3)
    new_scores, new = candidates(head, seqs, lambda h, w, i: teacher_logprobs_at_chunked(h, w, i, row_chunk=64,
                                                                                        vocab_chunk=100))
    for a, b in zip(new_scores, ref_scores):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(new, ref)


def test_chunked_logprobs_equal_float64_brute_force():
    head, seqs = random_scoring(5, n_seq=1, V=517)
    hidden, ids, _ = seqs[0]
    want = torch.log_softmax(hidden.double() @ head.double().T, -1).gather(-1, ids)
    got = teacher_logprobs_at_chunked(hidden.bfloat16(), head, ids, row_chunk=33, vocab_chunk=50)
    ref_bf16 = torch.log_softmax(hidden.bfloat16().double() @ head.double().T, -1).gather(-1, ids)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.allclose(got.double(), ref_bf16, atol=1e-4)          # bf16 rows are upcast, not rounded again
    got32 = teacher_logprobs_at_chunked(hidden, head, ids, row_chunk=1000, vocab_chunk=10_000)
    assert torch.allclose(got32.double(), want, atol=1e-4)
    assert teacher_logprobs_at_chunked(hidden[:0], head, ids[:0]).shape == (0, ids.shape[1])


def test_chunked_rejects_mismatched_shapes():
    head, seqs = random_scoring(0, n_seq=1)
    hidden, ids, _ = seqs[0]
    with pytest.raises(ValueError, match="ids"):
        teacher_logprobs_at_chunked(hidden, head, ids[:-1])
    with pytest.raises(ValueError, match="width"):
        teacher_logprobs_at_chunked(hidden[:, :-1], head, ids)
