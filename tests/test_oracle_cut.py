"""The oracle cut of rollouts at their first error (opd.cut_after_first_error, topd_ds/tasks/oracle_cut.py)."""

import json
import os
import random
import subprocess
import sys

from test_train_e2e import child_env   # the environment without an in-process run's rank variables

from topd_ds.tasks import deque, deque_alt
from topd_ds.tasks.oracle_cut import first_error, response_tokens_to_keep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "abcdefghijk0123456789=:,"


def _mutants(rng, response):
    """The response, a one-character mutation of it, and a prefix of it (stopped early)."""
    k = rng.randrange(len(response))
    yield response
    yield response[:k] + rng.choice(CHARS) + response[k + 1:]
    yield response[:k]


def test_the_first_error_is_the_checkers_on_deque():
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(200):
        p = deque.draw_problem(rng)
        for r in _mutants(rng, p.response):
            assert first_error(p.prompt, r, "deque") == deque.first_error(p.prompt, r), (p.prompt, r)


def test_deque_alt_cuts_right_after_the_first_token_labelled_error():
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(100):
        d = deque.draw_problem(rng)
        p = deque_alt.Problem(d.digits, d.ends, "".join(rng.choice("01") for _ in d.ends))
        for r in _mutants(rng, p.response):
            keep = response_tokens_to_keep(p.prompt, r, len(r) + 1, task="deque_alt")   # + <eos>
            labels = [deque_alt.label(p.prompt, r[:j], c) for j, c in enumerate(list(r) + [deque.EOS])]
            if deque_alt.is_valid_trace(p.prompt, r):
                assert keep == len(r) + 1 and "error" not in labels
            else:   # every token before the cut is valid, the last kept one is the first error
                assert labels[keep - 1] == "error" and "error" not in labels[:keep - 1]


def test_a_training_step_with_the_cut_trains_fewer_tokens_than_it_sampled(tmp_path):
    """One OPD step on the committed weak deque student (most sampled traces go wrong): the cut is logged and
    the tokens trained are the rollouts minus the cut."""
    env = child_env(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "topd_ds.cli", "train", "--config", "configs/deque-long/topd.yaml", "--resume", "none",
           "topd.mode=opd", "opd.cut_after_first_error=deque", f"train.out_dir={tmp_path}", "train.run_name=cut",
           "train.steps=1", "train.eval_samples=4", "rollout.prompts_per_step=2", "train.global_batch_size=8",
           "train.micro_batch_size=8"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    h = json.loads((tmp_path / "cut" / "summary.json").read_text())["history"][0]
    assert h["cost/tokens_cut"] > 0
    # trained = prompts + responses after the cut; every 11-digit prompt has the same length (23 characters)
    prompts = h["cost/tokens_trained"] - (h["cost/tokens_generated"] - h["cost/tokens_cut"])
    assert prompts % 8 == 0 and 23 <= prompts / 8 <= 26
