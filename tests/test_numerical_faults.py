"""Numerical faults (issue 8, promise 4): a step whose loss is non-finite is skipped on every rank without
moving the weights, counted in `train/nan_steps`, and `train.max_nan_steps` consecutive ones stop the run
with one line and a checkpoint that resumes.

One in-process trainer run on the tiny models (built-in servers, ZeRO-3, 3 steps, weights gathered at the
start of each step): an inf loss is injected at step 2 and a NaN loss at step 3 by wrapping the real
objective; max_nan_steps = 2 stops the run at step 3.
"""

import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from topd_ds.comm.distributed import gathered_state_dict
from topd_ds.errors import TopdError
from topd_ds.tasks.arith import make_splits, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN_AT = {2, 3}      # 1-based optimizer steps whose loss is made non-finite
MICRO_PER_STEP = 2      # global_batch_size 4 / micro_batch_size 2, world size 1


def _weights(ckpt_dir):
    out = {}
    for name in os.listdir(os.path.join(ckpt_dir, "export")):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(ckpt_dir, "export", name)))
    return out


def _same(a, b):
    """Bitwise equal on every tensor; an export may omit tied weights and buffers, so one side's names
    must all be in the other's."""
    small, big = sorted((a, b), key=len)
    assert small and set(small) <= set(big), (sorted(a), sorted(b))
    return all(torch.equal(small[k], big[k]) for k in small)


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_models, monkeypatch):
    from topd_ds.loss import objective
    from topd_ds.train import main

    real = objective.stage2_loss
    calls = []
    before = {}     # step -> the student's weights when that step starts (after the previous optimizer step)

    def poisoned(engine, *args, **kwargs):
        step = len(calls) // MICRO_PER_STEP + 1
        if len(calls) % MICRO_PER_STEP == 0:
            before[step] = gathered_state_dict(engine.module)
        calls.append(1)
        loss, terms = real(engine, *args, **kwargs)
        # a constant is added, so the gradient of the loss itself stays finite: only a trainer that
        # really skips the step keeps the weights (a zeroed loss would let AdamW's decay move them)
        bad = float("inf") if step == 2 else float("nan")
        return (loss + bad if step in NAN_AT else loss), terms

    monkeypatch.setattr(objective, "stage2_loss", poisoned)
    train, _ = make_splits(32, 0, seed=3, depth=2)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    cfg = {
        "model": {"teacher": tiny_models[0], "student": tiny_models[1]},
        "data": {"prompts": str(tmp_path / "train.jsonl"), "max_prompt_tokens": 64},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        "topd": {"mode": "opd"},
        "ot": {"solver": "exact"},
        "pipeline": {"max_staleness": 0},
        # weight decay on: a zero-gradient AdamW step would still shrink the weights
        "train": {"stage": "opd", "deepspeed_config": os.path.join(REPO, "tests/ds_zero3_partitioned.json"), "steps": 3,
                  "lr": 1e-2, "weight_decay": 0.1, "global_batch_size": 4, "micro_batch_size": 2,
                  "save_every": 0, "max_nan_steps": 2,
                  "out_dir": str(tmp_path / "runs"), "run_name": "nan"},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(TopdError) as err:
        main(["--config", str(path)])
    assert str(err.value) == ("2 consecutive non-finite losses/gradients at step 3; stopping "
                              "(train.max_nan_steps=2); checkpoint of step 2 saved")
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert os.listdir(ckpts) == ["step-00000002"]                      # save_every 0: only the stop-checkpoint
    w = {**before, 4: _weights(str(ckpts / "step-00000002"))}           # 4: after the (skipped) step 3
    assert sorted(w) == [1, 2, 3, 4]
    assert not _same(w[2], w[1])        # a good step moves the weights (weight decay 0.1, AdamW momentum)
    assert _same(w[3], w[2])            # inf at step 2: skipped, bit for bit
    assert _same(w[4], w[3])            # NaN at step 3: skipped; the stop-checkpoint holds step 1's weights
    assert all(torch.isfinite(v).all() for v in w[4].values())
    with open(ckpts / "step-00000002" / "state.json") as f:
        state = json.load(f)
    # the saved loop state resumes at step 2 with a fresh consecutive count
    assert state["step"] == 2 and state["nan_steps"] == 0 and state["total_nan_steps"] == 2
    assert [h["train/nan_steps"] for h in state["history"]] == [0, 1]     # logged: the running count
    assert math.isfinite(state["history"][0]["loss/total"])
    from topd_ds.checkpoint import find_resume, verify

    assert verify(str(ckpts / "step-00000002")) is None
    assert find_resume(str(tmp_path / "runs" / "nan"), "auto") == str(ckpts / "step-00000002")
