"""Stage-1 sample packing (topd_ds/loss/kd_packing.py, objective.stage1_loss_packed): in float64 on a tiny Qwen3,
the packed loss and gradients equal the unpacked direct reference (tests/reference_objective.py: full logits,
one padded row per sample) for every reduction; attention leaking across samples would change them."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_objective as ref  # noqa: E402
from topd_ds.loss import kd_packing, objective  # noqa: E402
from topd_ds.config import config_from_dict  # noqa: E402
from topd_ds.tasks.models import build_model  # noqa: E402

VOCAB, TEACHER_H = 40, 12


def kd_cfg(pack_to, reduction="token", kd_ratio=0.5):
    return config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                             "train": {"stage": "kd"}, "kd": {"pack_to": pack_to, "kd_ratio": kd_ratio},
                             "opd": {"chunk_size": 5, "reduction": reduction}}, check_paths=False)


def samples(n=5, seed=0):
    """n samples of different lengths (prompt 2-4 tokens, response 3-9), teacher hidden states per response token."""
    g = torch.Generator().manual_seed(seed)
    seqs, plens, hidden = [], [], []
    for _ in range(n):
        p, r = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(3, 10, (1,), generator=g))
        seqs.append([1] + torch.randint(3, VOCAB, (p - 1 + r,), generator=g).tolist())
        plens.append(p)
        hidden.append(torch.randn(r, TEACHER_H, generator=g, dtype=torch.float64))
    return seqs, plens, hidden


def tiny_student():
    model = build_model("qwen3", seed=3, vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2).double()
    model.config._attn_implementation = "sdpa"
    return model.train()


def loss_and_grads(fn, model, seqs, plens, hidden, cfg, teacher_head):
    model.zero_grad()
    loss, _ = fn(model, seqs, plens, hidden, cfg=cfg, teacher_head=teacher_head, pad_id=0, device="cpu")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_pack_layout():
    seqs, plens, hidden = samples()
    rows = kd_packing.pack_samples(seqs, plens, hidden, pack_to=20, pad_id=0, multiple=4)
    lengths = [len(s) for s in seqs]
    assert rows.ids.shape[0] < len(seqs) and rows.ids.shape[1] % 4 == 0
    assert int(rows.mask.sum()) == sum(n - p for n, p in zip(lengths, plens))
    assert int((rows.positions == 0).sum()) >= len(seqs)  # every sample (and padding) restarts at 0
    for r in range(rows.ids.shape[0]):  # no row over pack_to real tokens
        assert int((rows.sample[r] >= 0).sum()) <= 20
    assert kd_packing.assign_rows([5, 30, 4], 10) == [[0, 2], [1]]  # too long: a row of its own
    assert kd_packing.assign_rows([5, 6], 0) == [[0], [1]]


@pytest.mark.parametrize("reduction", ["token", "sequence", "batch"])
def test_packed_loss_and_gradients_equal_unpacked(reduction):
    """Five samples packed into rows of <= 20 tokens (two or three per row): loss and every parameter's gradient
    equal the unpacked direct reference to float64 rounding."""
    seqs, plens, hidden = samples()
    teacher_head = torch.randn(VOCAB, TEACHER_H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model = tiny_student()
    want, want_g = loss_and_grads(ref.stage1_loss, model, seqs, plens, hidden, kd_cfg(0, reduction), teacher_head)
    got, got_g = loss_and_grads(objective.stage1_loss_packed, model, seqs, plens, hidden, kd_cfg(20, reduction),
                                teacher_head)
    assert kd_packing.pack_samples(seqs, plens, pack_to=20, pad_id=0).ids.shape[0] < len(seqs)  # it packed
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (float(got), float(want))
    for name in want_g:
        assert torch.allclose(got_g[name], want_g[name], rtol=1e-8, atol=1e-10), \
            (name, float((got_g[name] - want_g[name]).abs().max()))


def test_attention_leak_would_be_caught(monkeypatch):
    """The comparison above can fail: with positions that do not restart per sample (one causal sequence per
    row, so each sample attends to the ones before it) the packed loss is off."""
    seqs, plens, hidden = samples()
    teacher_head = torch.randn(VOCAB, TEACHER_H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model = tiny_student()
    want, _ = loss_and_grads(ref.stage1_loss, model, seqs, plens, hidden, kd_cfg(0), teacher_head)
    pack = kd_packing.pack_samples

    def leaky(*args, **kwargs):
        rows = pack(*args, **kwargs)
        rows.positions = torch.arange(rows.ids.shape[1]).expand_as(rows.ids).clone()
        return rows
    monkeypatch.setattr(kd_packing, "pack_samples", leaky)
    got, _ = loss_and_grads(objective.stage1_loss_packed, model, seqs, plens, hidden, kd_cfg(20), teacher_head)
    assert abs(float(got) - float(want)) > 1e-4


def test_pure_ce_packed():
    """kd_ratio 0 (no teacher): packed CE equals the unpacked reference."""
    seqs, plens, _ = samples(seed=1)
    model = tiny_student()
    want, _ = loss_and_grads(ref.stage1_loss, model, seqs, plens, None, kd_cfg(0, kd_ratio=0.0), None)
    got, _ = loss_and_grads(objective.stage1_loss_packed, model, seqs, plens, None, kd_cfg(20, kd_ratio=0.0), None)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
