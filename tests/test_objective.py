"""The trainer's objective glue against brute-force float64 recomputation with plain models.

Checks the position bookkeeping that pure loss tests cannot see: which logits row scores which response
token, which prefix a probe window continues, and that each mode's terms are what the paper defines.
"""

import random

import pytest
import torch

from topd_ds.loss import objective

import reference_objective
from topd_ds.config import config_from_dict
from topd_ds.rollout.batch import Batch, Windows


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


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def close_grads(a, b) -> bool:
    """Equal up to float32 rounding of the largest entry (see the RMSNorm note below)."""
    return float((a - b).abs().max()) <= 1e-6 * max(float(b.abs().max()), 1e-3)


def with_estimator(cfg, estimator):
    import dataclasses

    return dataclasses.replace(cfg, opd=dataclasses.replace(cfg.opd, estimator=estimator))


def add_teacher_topk_and_tokens(batch, rng):
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    batch.teacher_topk_ids = [torch.stack([torch.randperm(16, generator=g)[:4] + 4 for _ in range(len(s) - p)])
                              for s, p in zip(batch.sequences, batch.prompt_lens)]
    batch.teacher_topk_logprobs = [torch.log_softmax(torch.randn(len(s) - p, 4, generator=g), -1) - 0.3
                                   for s, p in zip(batch.sequences, batch.prompt_lens)]
    batch.teacher_token_logprobs = [-torch.rand(len(s) - p, generator=g)
                                    for s, p in zip(batch.sequences, batch.prompt_lens)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_stage2_equals_the_direct_reference_in_float64(arch):
    """One packed forward to hidden states + chunked lm_head == full logits with one forward per window:
    the same loss and the same gradient of every parameter, for every mode and estimator."""
    from topd_ds.tasks.models import build_model

    teacher = build_model("qwen3", seed=1, vocab_size=20, hidden=16, layers=2, heads=2).double()
    student = build_model(arch, seed=2, vocab_size=20, hidden=8, layers=2, heads=2).double()
    head = teacher.get_output_embeddings().weight.detach().float()
    rng = random.Random(4)
    batch = random_batch(teacher, rng)
    add_teacher_topk_and_tokens(batch, rng)
    for mode in ("opd", "opd_dw_low_ot", "topd"):
        for estimator in ("full", "topk", "sampled"):
            cfg = with_estimator(cfg_for(mode), estimator)
            got = {}
            for name, fn in (("new", objective.stage2_loss), ("ref", reference_objective.stage2_loss)):
                loss, terms = fn(student, batch, [0, 1, 2], cfg=cfg, teacher_head=head, pad_id=0, device="cpu")
                got[name] = (loss.detach(), grads_of(student, loss), terms)
            (new, g_new, t_new), (ref, g_ref, t_ref) = got["new"], got["ref"]
            assert float(ref) > 0
            assert torch.allclose(new, ref, rtol=1e-12, atol=1e-12), (mode, estimator, new, ref)
            # RMSNorm computes in float32 even in a float64 model (Qwen3, Llama), so its backward rounds the
            # incoming gradient to float32: sums taken in another order (one forward vs one per window) may
            # differ there by float32 rounding, ~1e-7 relative. A wrong row or mask is off by O(1).
            for n in g_ref:
                assert close_grads(g_new[n], g_ref[n]), (mode, estimator, n, float((g_new[n] - g_ref[n]).abs().max()))
            assert t_new.get("tokens/traj_windows") == t_ref.get("tokens/traj_windows")


@pytest.mark.parametrize("kd_ratio", [0.5, 0.0])
def test_stage1_equals_the_direct_reference_in_float64(kd_ratio):
    import dataclasses

    from topd_ds.tasks.models import build_model

    teacher = build_model("qwen3", seed=1, vocab_size=20, hidden=16, layers=2, heads=2).double()
    student = build_model("qwen3", seed=3, vocab_size=20, hidden=8, layers=2, heads=2).double()
    head = teacher.get_output_embeddings().weight.detach().double()
    batch = random_batch(teacher, random.Random(5))
    cfg = cfg_for("opd")
    cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, kd_ratio=kd_ratio, temperature=1.5))
    hidden = None if kd_ratio == 0 else [h.double() for h in batch.teacher_hidden]
    got = []
    for fn in (objective.stage1_loss, reference_objective.stage1_loss):
        loss, _ = fn(student, batch.sequences, batch.prompt_lens, hidden, cfg=cfg, teacher_head=head, pad_id=0,
                     device="cpu")
        got.append((loss.detach(), grads_of(student, loss)))
    assert torch.allclose(got[0][0], got[1][0], rtol=1e-12, atol=1e-12)
    for n in got[1][1]:  # float32 RMSNorm: see test_stage2_equals_the_direct_reference_in_float64
        assert close_grads(got[0][1][n], got[1][1][n]), n


def test_trajectory_term_matches_brute_force(models):
    """L_traj from the packed forward against KL(y_j || p_S(. | x_<t + s_<j)) with one plain forward per
    window position and dense one-hot targets."""
    import dataclasses

    teacher, student = models
    batch = random_batch(teacher, random.Random(1))
    head = teacher.get_output_embeddings().weight.detach().float()
    cfg = cfg_for("topd")
    _, terms = objective.stage2_loss(student, batch, [0, 1, 2], cfg=cfg, teacher_head=head, pad_id=0, device="cpu")
    w = batch.windows
    refs = [brute_traj(student, batch.sequences[int(w.seq_index[m])], int(w.position[m]), w.teacher_ids[m],
                       w.teacher_mask[m], w.student_ids[m], w.student_mask[m], w.plan[m]) for m in range(2)]
    assert terms["tokens/traj_windows"] == 2
    # (the plan is float32: its soft targets carry float32 rounding, the brute force float64)
    assert terms["loss/traj"] == pytest.approx(float(torch.stack(refs).mean()), abs=1e-6)
    # a micro-batch without window sequences: no trajectory term logged, the same single forward
    cfg1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=1))
    loss, terms = objective.stage2_loss(student, batch, [1], cfg=cfg1, teacher_head=head, pad_id=0, device="cpu")
    assert terms["tokens/traj_windows"] == 0 and "loss/traj" not in terms
    assert terms["loss/total"] == pytest.approx(terms["loss/opd"])


def test_opd_matches_brute_force(models):
    teacher, student = models
    batch = random_batch(teacher, random.Random(0))
    head = teacher.get_output_embeddings().weight.detach().float()
    _, terms = objective.stage2_loss(student, batch, [0, 1, 2], cfg=cfg_for("opd"), teacher_head=head, pad_id=0,
                                     device="cpu")
    refs = torch.cat([brute_reverse_kl(student, teacher, s, p) for s, p in zip(batch.sequences, batch.prompt_lens)])
    assert terms["loss/opd"] == pytest.approx(float(refs.mean()), abs=2e-6)


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


@pytest.mark.parametrize("targets", ["paper", "until_divergence"])
def test_trajectory_options_match_brute_force(models, targets):
    """topd.traj_reduction=mean (per window token) and topd.traj_targets=until_divergence through the packed
    forward, against brute_traj with the plan cut after the first divergence (a zero column gives a zero target
    row) and divided by the window's target positions (issue 25)."""
    from topd_ds.loss import traj_targets as tt

    teacher, student = models
    batch = random_batch(teacher, random.Random(3))
    head = teacher.get_output_embeddings().weight.detach().float()
    cfg = cfg_for("topd", traj_reduction="mean", traj_targets=targets)
    _, terms = objective.stage2_loss(student, batch, [0, 1, 2], cfg=cfg, teacher_head=head, pad_id=0, device="cpu")
    w = batch.windows
    weights = tt.soft_targets(w, targets=targets)
    d = tt.first_divergence(w.teacher_ids, w.teacher_mask, w.student_ids, w.student_mask)
    refs = []
    for m in range(w.seq_index.numel()):
        plan = w.plan[m].clone()
        if targets == "until_divergence":
            plan[:, int(d[m]) + 1:] = 0  # student positions (columns) past the fork carry no target
        ref = brute_traj(student, batch.sequences[int(w.seq_index[m])], int(w.position[m]), w.teacher_ids[m],
                         w.teacher_mask[m], w.student_ids[m], w.student_mask[m], plan)
        n = int(tt.target_positions(weights[m:m + 1], w.student_mask[m:m + 1]).sum())
        if n:
            refs.append(ref / n)
    assert terms["loss/traj"] == pytest.approx(float(torch.stack(refs).mean()), abs=1e-6)
