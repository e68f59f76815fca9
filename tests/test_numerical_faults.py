"""Numerical faults (issue 8, promise 4): a step whose loss is non-finite is skipped on every rank without
moving the weights, counted in `train/nan_steps`, and `train.max_nan_steps` consecutive ones stop the run
with one line and a checkpoint that resumes.

One in-process trainer run on the tiny models (built-in servers, ZeRO-3, 5 steps): an inf loss is injected
at step 2 and NaN losses at steps 4 and 5 by wrapping the real objective; max_nan_steps = 2 stops it at step 5.
"""

import json
import math
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from topd_ds.errors import TopdError
from topd_ds.tasks.arith import make_splits, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN_AT = {2, 4, 5}      # 1-based optimizer steps whose loss is made non-finite
MICRO_PER_STEP = 2      # global_batch_size 4 / micro_batch_size 2, world size 1


def _weights(ckpt_dir):
    out = {}
    for name in os.listdir(os.path.join(ckpt_dir, "export")):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(ckpt_dir, "export", name)))
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_models, monkeypatch):
    import topd_ds.objective as objective
    from topd_ds.train import main

    real = objective.stage2_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        step = (len(calls) - 1) // MICRO_PER_STEP + 1
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
        "train": {"stage": "opd", "deepspeed_config": os.path.join(REPO, "ds_configs/zero3.json"), "steps": 5,
                  "lr": 1e-2, "weight_decay": 0.1, "global_batch_size": 4, "micro_batch_size": 2,
                  "save_every": 1, "keep_checkpoints": 10, "max_nan_steps": 2,
                  "out_dir": str(tmp_path / "runs"), "run_name": "nan"},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(TopdError) as err:
        main(["--config", str(path)])
    assert str(err.value) == ("2 consecutive non-finite losses/gradients at step 5; stopping "
                              "(train.max_nan_steps=2); checkpoint of step 4 saved")
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    w = {s: _weights(str(ckpts / f"step-{s:08d}")) for s in (1, 2, 3, 4)}
    initial = {k: v for k, v in load_file(os.path.join(tiny_models[1], "model.safetensors")).items() if k in w[1]}
    assert not _same(w[1], initial)     # a good step moves the weights
    assert _same(w[2], w[1])            # NaN at step 2: skipped, bit for bit
    assert not _same(w[3], w[2])        # step 3 trains again
    assert _same(w[4], w[3])            # NaN at steps 4 and 5: skipped; the stop-checkpoint holds step 3's weights
    assert all(torch.isfinite(v).all() for v in w[4].values())
    with open(ckpts / "step-00000004" / "state.json") as f:
        state = json.load(f)
    assert state["step"] == 4 and state["nan_steps"] == 0 and state["total_nan_steps"] == 3
    logged = [h["train/nan_steps"] for h in state["history"]]
    assert logged == [0, 1, 1, 2]
    assert all(math.isfinite(h["loss/total"]) for h in state["history"] if h["step"] in (1, 3))
    from topd_ds.checkpoint import find_resume, verify

    assert verify(str(ckpts / "step-00000004")) is None
    assert find_resume(str(tmp_path / "runs" / "nan"), "auto") == str(ckpts / "step-00000004")
