"""Training cost that rows can be matched on (issue 25): step times exclude evals and start-up, and every step
logs a machine-independent cost (tokens sampled by the servers, tokens through the student's forward).

One in-process TOPD run on the tiny models (ZeRO-3, built-in servers over HTTP), ~20-40 s.
"""

import json
import time

import pytest
import yaml

from test_train_e2e import write_config
from topd_ds.tasks.arith import make_splits, write_jsonl

SLOW_EVAL_S = 8.0  # far above a tiny-model step; today's clock (set before the loop) put it in step 1


def test_step_times_exclude_a_slow_eval_and_cost_is_logged(tmp_path, tiny_models, monkeypatch):
    from topd_ds import train

    train_rows, eval_rows = make_splits(64, 8, seed=5, depth=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train_rows)
    write_jsonl(str(tmp_path / "eval.jsonl"), eval_rows)
    real = train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(SLOW_EVAL_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    cfg = write_config(tmp_path, "cost", steps=2)
    cfg["model"] = {"teacher": tiny_models[0], "student": tiny_models[1]}
    (tmp_path / "cost.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    assert train.main(["--config", str(tmp_path / "cost.yaml")]) == 0
    wall = time.perf_counter() - t0
    history = json.loads((tmp_path / "runs" / "cost" / "summary.json").read_text())["history"]
    assert len(history) == 2 and wall > 2 * SLOW_EVAL_S  # both evals (steps 0 and 2) were slow
    for h in history:
        assert h["time/step_s"] < SLOW_EVAL_S, h["time/step_s"]  # fails on the old clock: step 1 held the eval
        n_seq = cfg["rollout"]["n_per_prompt"] * cfg["rollout"]["prompts_per_step"]
        rollout_tokens = h["pipeline/response_len"] * n_seq
        # probes: at least one token per model and candidate, at most K each
        k = cfg["topd"]["window"]
        assert rollout_tokens + 2 * h["pipeline/n_candidates"] <= h["cost/tokens_generated"] \
            <= rollout_tokens + 2 * k * h["pipeline/n_candidates"] + 1e-6
        # the student forward: the whole rollouts (prompt + response), plus < K tokens per trained window
        assert h["cost/tokens_trained"] > rollout_tokens
        assert h["cost/tokens_trained"] - rollout_tokens < 64 * n_seq + k * h["pipeline/n_candidates"] + 1e-6


@pytest.fixture(autouse=True)
def _clean_rank_env(monkeypatch):
    """The in-process run sets RANK/MASTER_PORT...; restored (unset if they were) after the test. setenv first so
    that monkeypatch records the variable's prior state even when it was unset."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
