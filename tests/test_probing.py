"""The CPU probing path: probes of one batch, run together with one prefill per rollout, give exactly the
windows that one-at-a-time generation with the same seeds gives (greedy and sampled), and the comparison is
sharp enough to catch mixed-up seeds or rows."""

import asyncio
import copy
import random

import pytest
import torch

from topd_ds.rollout import seeds
from topd_ds.rollout.batch import Batch
from topd_ds.config import config_from_dict
from topd_ds.engines import hf_engine
from topd_ds.engines.hf_engine import HFEngine, Row
from topd_ds.engines.protocol import Completion
from topd_ds.rollout.pipeline import Pipeline

K = 6


def test_shared_prefixes_matches_brute_force():
    from topd_ds.engines.hf_engine import shared_prefixes

    rng = random.Random(0)
    base = [[rng.randrange(5) for _ in range(12)] for _ in range(4)]
    prompts = [b[:rng.randrange(1, 13)] for b in base for _ in range(5)] + [base[0][:3], [9], [9]]
    rng.shuffle(prompts)
    roots, root_of = shared_prefixes(prompts)

    def extends(a, b):  # a has b as a prefix
        return len(a) >= len(b) and a[:len(b)] == b
    for i, p in enumerate(prompts):
        assert extends(prompts[root_of[i]], p) and root_of[i] in roots
    for g in roots:
        assert not any(extends(q, prompts[g]) and len(q) > len(prompts[g]) for q in prompts)
    maximal = {tuple(p) for p in prompts if not any(extends(q, p) and len(q) > len(p) for q in prompts)}
    assert len(roots) == len(maximal)
    assert shared_prefixes([[1, 2], [3]]) == ([0, 1], [0, 1])   # nothing shared: every row its own root


@pytest.fixture(scope="module")
def engines(tiny_models):
    """The built-in engine (float32) on the tiny teacher, and a float64 copy of its model as the reference."""
    engine = HFEngine(tiny_models[0], max_batch=64)
    ref = copy.deepcopy(engine.model).double().eval()
    return engine, ref


def probe_rows(temperature, eos_id):
    """4 rollouts, 3 probed prefixes each, in shuffled order, each with its run-unique probe seed."""
    rng = random.Random(1)
    rollouts = [[1] + [rng.randrange(3, 20) for _ in range(rng.randrange(20, 30))] for _ in range(4)]
    prefixes = [r[:t] for r in rollouts for t in sorted(rng.sample(range(5, len(r)), 3))]
    rng.shuffle(prefixes)
    row_seeds = [s[0] for s in seeds.seed_grid(7, seeds.PROBE_TEACHER, 3, len(prefixes))]
    return [Row(input_ids=p, max_new_tokens=K, temperature=temperature, seed=s, return_logprob=True,
                stop_token_ids=frozenset([eos_id])) for p, s in zip(prefixes, row_seeds)]


@torch.no_grad()
def reference_window(model, row, seed, eos_ids):
    """One row alone, float64, no KV cache: the full sequence re-run for every token; one uniform per token
    from the row's own generator (hf_engine's draw order), turned into a token by the float64 brute force."""
    from test_engines_server import reference_sample

    g = torch.Generator().manual_seed(seed)
    ids, out = list(row.input_ids), []
    for _ in range(row.max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        tok = reference_sample(logits, row.temperature, -1, 1.0, float(torch.rand((), generator=g)))
        out.append(tok)
        ids.append(tok)
        if tok in row.stop_token_ids or tok in eos_ids:
            break
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_batched_probes_equal_one_at_a_time(engines, temperature, monkeypatch):
    engine, ref = engines
    rows = probe_rows(temperature, eos_id=2)
    shared = []
    real = hf_engine.expand_shared
    monkeypatch.setattr(hf_engine, "expand_shared", lambda *a: shared.append(1) or real(*a))
    got = [a["output_ids"] for a in engine.generate(rows)]
    assert shared, "the probes of one rollout were not run from one shared prefill"
    want = [reference_window(ref, r, r.seed, engine.eos_ids) for r in rows]
    assert got == want
    assert all(len(w) >= 1 for w in got)
    # the comparison is sharp: answers handed to the wrong rows, or seeds moved by one row, do not pass
    assert got[::-1] != want
    if temperature > 0:
        moved = [r.seed for r in rows[1:] + rows[:1]]
        assert got != [reference_window(ref, r, s, engine.eos_ids) for r, s in zip(rows, moved)]


def test_one_prefill_per_rollout(engines, monkeypatch):
    """The prefill processes each probed rollout once (its longest probed prefix), not every probe's prefix."""
    engine, _ = engines
    rows = probe_rows(1.0, eos_id=2)
    prefill_rows = []
    real = engine._forward

    def spy(ids, mask, pos, cache):
        if ids.shape[1] > 1:
            prefill_rows.append(ids.shape[0])
        return real(ids, mask, pos, cache)
    monkeypatch.setattr(engine, "_forward", spy)
    engine.generate(rows)
    assert prefill_rows == [4], f"prefill of {prefill_rows} rows for 12 probes of 4 rollouts"


class _SlowClient:
    """continue_from takes 0.2 s and records how many calls overlap."""

    def __init__(self, log):
        self.log = log

    async def continue_from(self, prefixes, k, params, *, seeds=None):
        self.log["now"] += 1
        self.log["max"] = max(self.log["max"], self.log["now"])
        await asyncio.sleep(0.2)
        self.log["now"] -= 1
        return [Completion([3] * k, [0.0] * k, "length") for _ in prefixes]

    async def close(self):
        pass


def test_high_and_low_loss_probes_run_concurrently():
    """false_alarm=low_loss_range probes two sets of prefixes: all four requests (2 sets x 2 models) are in
    flight at once, so probing costs one round trip, not two."""
    log = {"now": 0, "max": 0}
    cfg = config_from_dict({
        "model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 1, "max_new_tokens": 10},
        "topd": {"mode": "topd", "window": 4, "candidate_count": 2, "false_alarm": "low_loss_range",
                 "low_loss_probes": 2},
        "ot": {"solver": "exact"}, "pipeline": {"max_staleness": 0},
        "train": {"global_batch_size": 2, "micro_batch_size": 2}}, check_paths=False)

    async def clients():
        return _SlowClient(log), _SlowClient(log)
    pipe = Pipeline(prompts=[[1, 4]], make_clients=clients, teacher_head=torch.randn(8, 4),
                    embedding=torch.randn(8, 4), cfg=cfg, start_step=0, eos_id=2, pad_id=0, weight_version=0,
                    produce=False)
    batch = Batch(step=0, weight_version=0, sequences=[[1, 4, 5, 6, 7, 5, 6, 7]] * 2, prompt_lens=[2, 2], stats={})
    batch.selection_score = [torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.1])] * 2
    try:
        pipe.call(pipe._probe_and_label(batch))
    finally:
        pipe.close()
    # all four probes in flight at once (a counter, not a wall-clock bound a loaded machine can break)
    assert log["max"] == 4, log
