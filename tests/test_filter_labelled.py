"""The filter study within the labelled set (issue 25): flags, per-detector chance references and AUROC with
bootstrap intervals, against hand-computed examples and a brute-force pair count."""

import itertools
import math
import random

import numpy as np
import pytest

from topd_ds.studies import stats
from topd_ds.studies.filter_labelled import analyse_labelled, markdown_labelled

SEED = 2514
print(f"test_filter_labelled: seed {SEED}")


def test_auroc_equals_the_pair_count_and_the_bootstrap_covers_it():
    rng = random.Random(SEED)
    scores = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(40)]  # many ties
    labels = [rng.random() < 0.4 for _ in range(40)]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    won = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    brute = won / (len(pos) * len(neg))
    assert stats.auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    b = stats.bootstrap_auroc(scores, labels, n_boot=300, seed=1)
    assert b["ci"][0] <= b["auroc"] <= b["ci"][1] and b["ci"][1] - b["ci"][0] > 0.05
    assert math.isnan(stats.auroc([1, 2], [True, True]))


def test_flags_within_the_labelled_set_with_a_chance_reference_per_detector():
    # one batch of 6 candidates, 4 labelled benign/error (the teacher's token and an unlabelled one left out)
    recs = [
        {"label": "benign_reconverging", "scores": {"d_ot": 0.1, "teacher_entropy": 0.9}},
        {"label": "benign_diverging", "scores": {"d_ot": 0.5, "teacher_entropy": 0.2}},
        {"label": "error", "scores": {"d_ot": 0.2, "teacher_entropy": 0.1}},
        {"label": "error", "scores": {"d_ot": 0.9, "teacher_entropy": 0.8}},
        {"label": "teacher", "scores": {"d_ot": 0.0, "teacher_entropy": 1.0}},
        {"label": None, "scores": {"d_ot": 0.0, "teacher_entropy": 1.0}},
    ]
    r = analyse_labelled([recs], q=0.5, n_boot=200)
    assert r["n"] == 4 and r["counts"] == {"benign_diverging": 1, "benign_reconverging": 1, "error": 2}
    d = r["detectors"]["d_ot"]  # flags the 2 smallest of the 4: 0.1 (benign), 0.2 (error)
    assert (d["flagged"], d["precision"], d["recall"], d["errors_flagged"]) == (2, 0.5, 0.5, 0.5)
    assert (d["chance_precision"], d["chance_recall"]) == (0.5, 0.5)
    # AUROC, benign high after orienting (-d_ot): benign -0.1, -0.5 vs error -0.2, -0.9 -> pairs won: 1 + 1 + 0 + 1
    assert d["auroc"] == pytest.approx(3 / 4)
    e = r["detectors"]["teacher_entropy"]  # flags 0.9 (benign) and 0.8 (error)
    assert (e["precision"], e["recall"]) == (0.5, 0.5)
    assert e["auroc"] == pytest.approx(3 / 4)  # 0.9 beats both errors, 0.2 beats 0.1 only
    assert e["auroc_by_kind"]["benign_reconverging"]["auroc"] == 1.0
    assert e["auroc_by_kind"]["benign_diverging"]["auroc"] == 0.5
    table = markdown_labelled(r)
    assert "(chance)" in table and "AUROC benign vs error [95% bootstrap]" in table


def test_every_detector_flags_the_same_budget_even_where_unlabelled_candidates_differ():
    # the old analysis flagged over all candidates, so detectors preferring unlabelled ones flagged fewer labelled
    rng = np.random.default_rng(SEED)
    batches = []
    for _ in range(5):
        recs = []
        for _ in range(20):
            lab = rng.choice(["benign", "error", None, "teacher"])
            scores = {"d_a": float(rng.random()), "teacher_prob_of_token": float(rng.random())}
            recs.append({"label": lab, "scores": scores})
        batches.append(recs)
    r = analyse_labelled(batches, q=0.3, n_boot=50)
    want = sum(int(round(0.3 * sum(1 for x in recs if x["label"] in ("benign", "error")))) for recs in batches)
    assert {d["flagged"] for d in r["detectors"].values()} == {want}


def test_the_cluster_bootstrap_resamples_whole_groups():
    # two groups that each hold one positive and one negative, ordered oppositely: a group resample only ever
    # yields AUROC 0, 1/2 or 1 by whole-group counts, while the item bootstrap gives other values too
    scores, labels, groups = [1.0, 0.0, 0.0, 1.0], [1, 0, 1, 0], [0, 0, 1, 1]
    rng = np.random.default_rng(SEED)
    seen = set()
    for s in range(40):
        b = stats.bootstrap_auroc(scores, labels, groups=groups, n_boot=1, seed=int(rng.integers(1 << 30)))
        seen.add(b["ci"][0])
    assert seen <= {0.0, 0.5, 1.0} and stats.auroc(scores, labels) == 0.5
    batch = [{"label": "benign", "scores": {"d_x": 0.1}}, {"label": "error", "scores": {"d_x": 0.9}}]
    r = analyse_labelled([batch] * 3, q=0.5, n_boot=100)
    assert r["detectors"]["d_x"]["ci"] == (1.0, 1.0)  # every batch separates perfectly: so does every resample
