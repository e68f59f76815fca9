"""`topd-ds filter-study`: its labels, detectors and precision / recall against brute-force references."""

import math
import os
import random

import numpy as np
import pytest
import torch

from topd_ds.studies import filter_study as fs
from topd_ds.tasks import deque

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    """The shipped configs name repo-relative paths, as a user runs them from the checkout: so does each test
    here, wherever pytest was started."""
    monkeypatch.chdir(REPO)


def test_token_label_follows_the_checker():
    prompt = "a4b7c1="
    assert fs.token_label(deque.valid_next(prompt, ""), "a", "a") == "teacher"
    assert fs.token_label(deque.valid_next(prompt, ""), "c", "a") == "benign"     # the other end: valid
    assert fs.token_label(deque.valid_next(prompt, ""), "b", "a") == "error"      # the middle: never valid
    assert fs.token_label(deque.valid_next(prompt, "b"), "7", "7") is None        # prefix already invalid


def test_teacher_position_scores_match_float64_brute_force():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    logits = torch.randn(7, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (7,), generator=g)
    got = fs.teacher_position_scores(logits, tokens)
    for m in range(7):
        p = [math.exp(x) for x in logits[m].double().tolist()]
        z = sum(p)
        p = [x / z for x in p]
        ent = -sum(x * math.log(x) for x in p)
        top = sorted(p, reverse=True)
        assert got["teacher_entropy"][m] == pytest.approx(ent, rel=1e-9)
        assert got["teacher_prob_of_token"][m] == pytest.approx(p[tokens[m]], rel=1e-9)
        assert got["teacher_top2_margin"][m] == pytest.approx(-(top[0] - top[1]), abs=1e-12)


def test_flag_top_takes_the_highest_and_breaks_ties_by_position():
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0])
    assert fs.flag_top(s, 2).tolist() == [False, True, False, True, False]
    assert fs.flag_top(s, 0).sum() == 0
    assert fs.flag_top(torch.ones(4), 2).tolist() == [True, True, False, False]


def test_deque_state_distance_sees_reconverging_orders():
    prompt = "a4b7c1d9="   # ends a / d
    # left-then-right and right-then-left take the same two digits: the states agree again
    assert fs.deque_state_distance(prompt, "", "a4=4:bd,d9=13:bc", "d9=9:ac,a4=13:bc") == 0
    # after one step each they differ by one digit at each end
    assert fs.deque_state_distance(prompt, "", "a4=4:bd", "d9=9:ac") == 2
    # a window that leaves every valid derivation gets the maximum (the number of digits)
    assert fs.deque_state_distance(prompt, "", "a4=4:bd", "b7") == 4


def test_precision_recall_against_counting():
    rng = np.random.default_rng(random.randrange(1 << 30))
    labels = rng.choice(["benign", "error", "teacher"], size=200)
    flagged = rng.random(200) < 0.3
    got = fs.precision_recall(flagged, labels)
    benign = [f for f, lab in zip(flagged, labels) if lab == "benign"]
    assert got["recall"] == pytest.approx(sum(benign) / len(benign))
    assert got["precision"] == pytest.approx(sum(f and lab == "benign" for f, lab in zip(flagged, labels)) / flagged.sum())
    valid = [f for f, lab in zip(flagged, labels) if lab != "error"]
    assert got["recall_valid"] == pytest.approx(sum(valid) / len(valid))
    errors = [f for f, lab in zip(flagged, labels) if lab == "error"]
    assert got["errors_flagged"] == pytest.approx(sum(errors) / len(errors))


def test_analyse_flags_per_batch_and_a_perfect_detector_scores_perfectly():
    # d_oracle is 0 exactly on the benign candidates, which are q of each batch: precision = recall = 1.
    rng = random.Random(random.randrange(1 << 30))
    batches = []
    for _ in range(3):
        recs = []
        for i in range(10):
            label = "benign" if i < 3 else rng.choice(["error", "teacher", None])
            recs.append({"label": label, "scores": {"d_oracle": 0.0 if label == "benign" else 1.0 + rng.random(),
                                                    "teacher_entropy": rng.random()}})
        rng.shuffle(recs)
        batches.append(recs)
    out = fs.analyse(batches, q=0.3)
    assert out["detectors"]["d_oracle"]["precision"] == 1.0 and out["detectors"]["d_oracle"]["recall"] == 1.0
    assert out["detectors"]["d_oracle"]["flagged"] == sum(r["label"] is not None
                                                          for recs in batches for r in recs if r["label"] == "benign")
    assert out["n_candidates"] == 30 and out["n_labelled"] == sum(r["label"] is not None for b in batches for r in b)
    assert "| d_oracle | 100.0% | 100.0% |" in fs.markdown(out)


def test_filter_study_command_on_the_committed_deque_models(tmp_path):
    out = tmp_path / "filter"
    assert fs.main(["--config", "configs/deque/topd.yaml", "--out", str(out), "--batches", "1", "--windows", "2", "6", "--",
                    "rollout.prompts_per_step=4", "rollout.n_per_prompt=2", "train.global_batch_size=8",
                    "train.micro_batch_size=8", "topd.candidate_fraction=0.1"]) == 0
    import json
    result = json.loads((out / "filter.json").read_text())
    recs = [r for b in result["candidates"] for r in b]
    assert len(recs) == result["n_candidates"] > 0
    for r in recs:   # every label is the checker's, recomputed from what the record says
        assert r["label"] == fs.token_label(deque.valid_next(r["prompt"], r["prefix"]), r["token"], r["teacher_argmax"])
        assert {"d_ot_cosine_k2", "d_ot_onehot_k6", "d_state_k6", "teacher_entropy"} <= set(r["scores"])
        assert 0.0 <= r["scores"]["d_ot_onehot_k6"] <= 1.0 + 1e-6
        mass = r["scores"]["student_invalid_mass"]   # NaN exactly where the checker has no answer
        assert math.isnan(mass) == (r["label"] is None)
        if r["label"] == "error":    # the student sampled an invalid token, so it had mass there
            assert mass > 0.0
    assert set(result["detectors"]) >= {"d_ot_cosine_k6", "d_state_k2", "teacher_top2_margin", "chance"}


def test_onehot_distance_equals_cosine_on_an_identity_table():
    # the 0/1 cost built from ids equals the configured path on a one-hot embedding table (the old construction)
    from topd_ds.config import load_config
    from topd_ds.rollout.pipeline import window_ot

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    ids_t, ids_s = torch.randint(0, 6, (5, 7), generator=g), torch.randint(0, 6, (5, 7), generator=g)
    mask_t, mask_s = torch.rand(5, 7, generator=g) > 0.2, torch.rand(5, 7, generator=g) > 0.2
    mask_t[:, 0] = mask_s[:, 0] = True
    cfg = load_config("configs/deque/topd.yaml")   # cosine cost, Sinkhorn with the trainer's settings
    w = fs.Windows(torch.arange(5), torch.arange(5), ids_t, mask_t, ids_s, mask_s, None, None)
    got = fs.onehot_distance(w, cfg)
    want = window_ot(torch.eye(6), ids_t, mask_t, ids_s, mask_s, cfg).distance
    assert torch.allclose(got, want, atol=1e-6)


def test_invalid_mass_is_the_probability_outside_the_allowed_tokens():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    logits = torch.randn(9, generator=g) * 2
    p = [math.exp(x) for x in logits.double().tolist()]
    allowed = [1, 4, 7]
    assert fs.invalid_mass(logits, allowed) == pytest.approx(sum(p[i] for i in range(9) if i not in allowed) / sum(p),
                                                             rel=1e-12)
    assert math.isnan(fs.invalid_mass(logits, None))
    assert fs.invalid_mass(logits, []) == 1.0
    assert fs.invalid_mass(logits, range(9)) == pytest.approx(0.0, abs=1e-12)


def test_student_position_logits_equal_a_forward_on_each_prefix():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(random.randrange(1 << 30))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    seqs = [[random.randrange(13) for _ in range(12)] for _ in range(2)]
    items = [(0, 5), (1, 3), (0, 11), (1, 9)]   # two candidates per sequence, out of order
    got = fs.student_position_logits(model, [seqs[b] for b, _ in items], [t for _, t in items])
    with torch.no_grad():
        for m, (b, t) in enumerate(items):
            want = model(torch.tensor([seqs[b][:t]])).logits[0, -1]
            assert torch.allclose(got[m], want, atol=1e-5)


def test_the_student_invalid_mass_is_flagged_when_small():
    batches = [[{"label": "benign", "scores": {"student_invalid_mass": 0.01}},
                {"label": "error", "scores": {"student_invalid_mass": 0.6}},
                {"label": "error", "scores": {"student_invalid_mass": 0.4}},
                {"label": None, "scores": {"student_invalid_mass": math.nan}}]]
    out = fs.analyse(batches, 0.25)
    assert out["detectors"]["student_invalid_mass"]["precision"] == 1.0   # the one flag is the benign token
