"""The trainer's objective glue against brute-force float64 recomputation with plain models.

Checks the position bookkeeping that pure loss tests cannot see: which logits row scores which response
token, which prefix a probe window continues, and that each mode's terms are what the paper defines.
"""

import random

import pytest
import torch

from topd_ds import objective
from topd_ds.config import config_from_dict
from topd_ds.batch import Batch, Windows


@pytest.fixture(scope="module")
def models(tiny_models):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[0]).double().eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_models[1]).double().eval()
    return teacher, student


def cfg_for(mode, **topd):
    return config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                             "topd": {"mode": mode, **topd}, "opd": {"chunk_size": 3},
                             "rollout": {"n_per_prompt": 1, "prompts_per_step": 3},
                             "train": {"global_batch_size": 3, "micro_batch_size": 3}}, check_paths=False)


def random_batch(teacher, rng, n=3, k=4):
    seqs, plens = [], []
    for _ in range(n):
        p = rng.randint(2, 5)
        r = rng.randint(3, 8)
        seqs.append([1] + [rng.randint(4, 19) for _ in range(p - 1 + r)])
        plens.append(p)
    hidden = []
    with torch.no_grad():
        for s, p in zip(seqs, plens):
            h = teacher(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
            hidden.append(h[p - 1:len(s) - 1].float())
    batch = Batch(step=0, weight_version=0, sequences=seqs, prompt_lens=plens, teacher_hidden=hidden)
    batch.marked = [torch.tensor([rng.random() < 0.4 for _ in range(len(s) - p)]) for s, p in zip(seqs, plens)]
    # two windows at random response positions, the second stopping early
    m = 2
    seq_index = torch.tensor([0, 2])
    position = torch.tensor([plens[0] + 1, plens[2] + 2])
    t_ids = torch.randint(4, 20, (m, k))
    s_ids = torch.randint(4, 20, (m, k))
    t_mask = torch.ones(m, k, dtype=torch.bool)
    s_mask = torch.ones(m, k, dtype=torch.bool)
    t_mask[1, 3:] = False
    s_mask[1, 2:] = False
    plan = torch.rand(m, k, k) * t_mask[:, :, None] * s_mask[:, None, :]
    batch.windows = Windows(seq_index, position, t_ids, t_mask, s_ids, s_mask, plan / plan.sum((1, 2), keepdim=True),
                            torch.rand(m))
    return batch


def brute_reverse_kl(student, teacher, seq, p):
    """sum_v p_S log(p_S/p_T) at every response token of one sequence, float64, no batching."""
    ids = torch.tensor([seq])
    ls = torch.log_softmax(student(input_ids=ids).logits[0], -1)
    lt = torch.log_softmax(teacher(input_ids=ids).logits[0], -1)
    rows = range(p - 1, len(seq) - 1)  # row t-1 predicts token t
    return torch.stack([(ls[r].exp() * (ls[r] - lt[r])).sum() for r in rows])


def brute_traj(student, seq, pos, t_ids, t_mask, s_ids, s_mask, plan):
    """KL(y_j || p_S(. | x_<t + s_<j)) summed over the window, dense one-hot targets."""
    total = torch.zeros((), dtype=torch.float64)
    V = student.config.vocab_size
    for j in range(s_ids.numel()):
        if not s_mask[j]:
            continue
        col = plan[:, j].double() * t_mask.double()
        if col.sum() <= 0:
            continue
        y = torch.zeros(V, dtype=torch.float64)
        for i in range(t_ids.numel()):
            y[t_ids[i]] += col[i]
        y /= y.sum()
        ctx = torch.tensor([seq[:pos] + s_ids[:j].tolist()])
        lp = torch.log_softmax(student(input_ids=ctx).logits[0, -1], -1)
        total += (torch.special.xlogy(y, y) - y * lp).sum()
    return total


def test_opd_per_token_matches_brute_force(models):
    teacher, student = models
    rng = random.Random(0)
    batch = random_batch(teacher, rng)
    # the teacher head of the tiny model is tied to its embeddings
    head = teacher.get_output_embeddings().weight.detach().float()
    logits, _ = objective.student_logits(student, batch.sequences, 0, "cpu")
    per, _, mask = objective.opd_per_token(logits, batch, [0, 1, 2], estimator="full", teacher_head=head, chunk_size=3)
    for b, (s, p) in enumerate(zip(batch.sequences, batch.prompt_lens)):
        ref = brute_reverse_kl(student, teacher, s, p)
        got = per[b][mask[b]]
        assert got.shape == ref.shape
        assert torch.allclose(got.double(), ref, atol=2e-5), (got, ref)
    assert not bool(per[~mask].abs().gt(0).any())


def test_trajectory_term_matches_brute_force(models):
    teacher, student = models
    batch = random_batch(teacher, random.Random(1))
    traj, n = objective.trajectory_term(student, batch, [0, 1, 2], pad_id=0, device="cpu", chunk_size=2)
    w = batch.windows
    refs = [brute_traj(student, batch.sequences[int(w.seq_index[m])], int(w.position[m]), w.teacher_ids[m],
                       w.teacher_mask[m], w.student_ids[m], w.student_mask[m], w.plan[m]) for m in range(2)]
    assert n == 2
    assert torch.allclose(traj.double(), torch.stack(refs).mean(), atol=1e-5), (traj, refs)
    # a micro-batch without window sequences still runs a forward and a backward (ZeRO-3 collectives),
    # on a zero-weight dummy window: loss 0, every gradient 0
    zero, n = objective.trajectory_term(student, batch, [1], pad_id=0, device="cpu", chunk_size=2)
    assert n == 0 and float(zero.detach()) == 0.0 and zero.requires_grad
    student.zero_grad()
    zero.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and not bool(g.abs().gt(0).any()) for g in grads)
    student.zero_grad()


def test_modes_compose_their_terms(models):
    teacher, student = models
    batch = random_batch(teacher, random.Random(2))
    head = teacher.get_output_embeddings().weight.detach().float()
    out = {}
    for mode in ("opd", "opd_dw_low_ot", "topd"):
        loss, terms = objective.stage2_loss(student, batch, [0, 1, 2], cfg=cfg_for(mode), teacher_head=head,
                                            pad_id=0, device="cpu")
        out[mode] = (float(loss.detach()), terms)
    opd, dw, topd = out["opd"][1], out["opd_dw_low_ot"][1], out["topd"][1]
    assert opd["loss/opd"] == pytest.approx(opd["loss/opd_raw"])
    assert dw["loss/opd"] <= opd["loss/opd"] + 1e-7  # capping only lowers token losses
    assert dw["tokens/capped"] == sum(int(m.sum()) for m in batch.marked)
    assert topd["loss/total"] == pytest.approx(topd["loss/opd"] + 1.0 * topd["loss/traj"], rel=1e-6)
    assert "loss/traj" not in opd


def test_loss_falls_on_a_fixed_batch(models, tiny_models):
    from transformers import AutoModelForCausalLM

    teacher, _ = models
    student = AutoModelForCausalLM.from_pretrained(tiny_models[1]).train()
    batch = random_batch(teacher, random.Random(3))
    head = teacher.get_output_embeddings().weight.detach().float()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = objective.stage2_loss(student, batch, [0, 1, 2], cfg=cfg_for("topd"), teacher_head=head,
                                        pad_id=0, device="cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
