"""The stage-2 objective's top-k and sampled-token estimators, with median capping, against a brute-force float64
oracle that shares no code with topd_ds.loss.losses / divergence / chunked (tests/reference_objective.py does).

`objective.stage2_loss` (packed hidden states, LossHead, chunked lm_head, cap scale) on a plain tiny Qwen3 student in
float32, mode opd_dw_low_ot (capping on, no trajectory term); the oracle: one unpadded float64 forward per sequence to
full logits, then per response token, written out from the definitions in docs/LOSSES.md with Python loops:

    top-k:    k + 1 categories (the teacher's k ids and a tail 1 - sum, floored at 1e-6), sum_c p_S (log p_S - log p_T)
    sampled:  v = log p_S(x_t) - log p_T(x_t); per-token loss v.detach() * log p_S(x_t) (the policy-gradient form)
    capping:  at marked tokens whose v exceeds numpy's median of the sequence's v: scale min(1, max(0, median / v)),
              detached; the loss is the mean over the micro-batch's response tokens

Values and the gradient of every student parameter are compared. Seeds are fixed (printed in the ids).
"""

import math

import numpy as np
import pytest
import torch

from two_rank_objective import make_batch, topd_cfg

# float32 production vs float64 oracle, largest errors seen over this module's 4 cases (2026-12-06, 2-core CPU):
# loss 5.2e-8 relative, gradients 2.3e-7 absolute (the embedding's, entries up to 1.09); bounds with ~9-19x margin
LOSS_RTOL = 1e-6
GRAD_ATOL = 2e-6


def _student(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _oracle(model64, batch, estimator, tail_floor=1e-6):
    """(loss, number of capped tokens): the float64 brute force of the docstring, differentiable in model64."""
    total, count, capped = 0.0, 0, 0
    for b, (seq, p) in enumerate(zip(batch.sequences, batch.prompt_lens)):
        logp = torch.log_softmax(model64(input_ids=torch.tensor([seq])).logits[0].double(), -1)  # (L, V)
        values, pers = [], []
        for j, t in enumerate(range(p, len(seq))):  # response token t, predicted at row t - 1
            q = logp[t - 1]
            if estimator == "topk":
                ids = batch.teacher_topk_ids[b][j].tolist()
                lt = [float(x) for x in batch.teacher_topk_logprobs[b][j].double()]
                ps = [torch.exp(q[i]) for i in ids]
                pt = [math.exp(x) for x in lt]
                tail_s = torch.clamp(1 - sum(ps), min=tail_floor)
                tail_t = max(1 - sum(pt), tail_floor)
                kl = sum(a * (torch.log(a) - math.log(c)) for a, c in zip(ps, pt))
                kl = kl + tail_s * (torch.log(tail_s) - math.log(tail_t))
                values.append(float(kl.detach()))
                pers.append(kl)
            else:
                lps = q[seq[t]]
                v = float(lps) - float(batch.teacher_token_logprobs[b][j])
                values.append(v)
                pers.append(v * lps)
        med = float(np.median(values))
        for j, (v, per) in enumerate(zip(values, pers)):
            scale = 1.0
            if bool(batch.marked[b][j]) and v > med:
                scale, capped = min(1.0, max(0.0, med / v)), capped + 1
            total = total + per * scale
            count += 1
    return total / count, capped


@pytest.mark.parametrize("estimator", ["topk", "sampled"])
@pytest.mark.parametrize("seed", [0, 1])
def test_estimators_and_capping_equal_a_float64_brute_force(tiny_models, estimator, seed):
    from topd_ds.loss.lm_head import attach_loss_head
    from topd_ds.loss.objective import stage2_loss

    model = _student(tiny_models[1], torch.float32)
    attach_loss_head(model)
    vocab = model.config.vocab_size
    batch = make_batch(vocab, 16, windows_on=(), seed=seed)
    batch.windows = None
    g = torch.Generator().manual_seed(100 + seed)  # about half the tokens marked: some above their median
    batch.marked = [torch.rand(len(s) - p, generator=g) < 0.5 for s, p in zip(batch.sequences, batch.prompt_lens)]
    cfg = topd_cfg(mode="opd_dw_low_ot", estimator=estimator)
    teacher_head = torch.randn(vocab, 16, generator=torch.Generator().manual_seed(seed))  # unused by these two
    loss, _ = stage2_loss(model, batch, [0, 1], cfg=cfg, teacher_head=teacher_head, pad_id=0,
                          device=torch.device("cpu"))
    loss.backward()

    model64 = _student(tiny_models[1], torch.float64)
    want, capped = _oracle(model64, batch, estimator)
    assert capped > 0, "no token was capped: the case does not test capping"
    want.backward()
    got, ref = float(loss), float(want)
    assert abs(got - ref) <= LOSS_RTOL * abs(ref), (estimator, seed, got, ref)
    grads = dict(model64.named_parameters())
    for name, p in model.named_parameters():
        g, r = p.grad.double(), grads[name].grad
        assert r is not None and float(r.abs().max()) > 0, name
        err = float((g - r).abs().max())
        assert err <= GRAD_ATOL, (estimator, seed, name, err, float(r.abs().max()))
