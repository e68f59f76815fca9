"""Stage-1 sequence parallelism (topd_ds/sequence_parallel.py: DeepSpeed's own Ulysses) with sample packing: two
gloo ranks of one Ulysses group give the plain single-process loss and gradients (tests/two_rank_sp.py), under
ZeRO-3 and ZeRO-2; and the settings it cannot run with stop with one line naming the key."""

import pytest
import torch

import torchrun

from topd_ds.config import config_from_dict, resolve_deepspeed_config
from topd_ds.errors import ConfigError

TIMEOUT_S = 150  # a clean run takes ~45 s on 2 shared cores; a hang is cut by the worker's 40 s gloo timeout


def test_two_rank_packed_sequence_parallel_equals_plain(tiny_models, tmp_path):
    """Four samples packed into one 38-token row; each rank runs the student on its 19 tokens (Ulysses'
    all-to-all gives attention the whole row, two heads each) and the loss on its 19 rows. The group's loss
    equals the plain one (unpacked, full logits, no DeepSpeed), and DeepSpeed's reduced gradient of every
    parameter equals the plain gradient: attention leaking across the packed samples (DeepSpeed's wrapper over
    plain sdpa) moved the loss by 4e-3 and gradients by up to 0.05; each rank's share unscaled under ZeRO-3
    (which divides by the whole world) halved every gradient."""
    out_file = tmp_path / "out.pt"
    torchrun.run_ranks("two_rank_sp.py", ["--student", tiny_models[1], "--out", out_file], world=2, port=29581,
                       timeout_s=TIMEOUT_S, what="packed sequence parallel")
    out = torch.load(out_file)
    for stage in ("zero3", "zero2"):
        got = out[stage]
        assert got["local_ids_shape"] == (1, 19), got["local_ids_shape"]  # one row, half of its 38 tokens
        assert got["loss"] == pytest.approx(out["ref_loss"], rel=1e-6), (stage, got["loss"], out["ref_loss"])
        assert set(got["grads"]) == set(out["ref_grads"])
        for name, want in out["ref_grads"].items():
            assert torch.allclose(got["grads"][name], want, rtol=1e-5, atol=1e-7), \
                (stage, name, float((got["grads"][name] - want).abs().max()))


def _cfg(**train):
    return config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                             "train": {"stage": "kd", "global_batch_size": 4, **train}}, check_paths=False)


def test_bad_sequence_parallel_settings_name_the_key(tiny_models, tmp_path):
    from topd_ds import sequence_parallel

    with pytest.raises(ConfigError, match=r"^train.sequence_parallel_size: 2 > 1 is built for stage 1 only"):
        config_from_dict({"model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
                          "train": {"sequence_parallel_size": 2}}, check_paths=False)
    with pytest.raises(ConfigError, match=r"^train.sequence_parallel_size: 2 does not divide the 3 rank"):
        resolve_deepspeed_config(_cfg(sequence_parallel_size=2), world_size=3)
    with pytest.raises(ConfigError, match=r"train.sequence_parallel_size: 3 must divide the student's 4 attention"):
        sequence_parallel.check(tiny_models[1], 3, 6)
    sequence_parallel.check(tiny_models[1], 2, 4)
    ds_json = tmp_path / "z3.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3, "reduce_scatter": false}}')
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_scatter: must be true with train.sequence"):
        resolve_deepspeed_config(_cfg(sequence_parallel_size=2, deepspeed_config=str(ds_json)), world_size=2)
    # two ranks, one Ulysses group: one data-parallel stream, so no gradient accumulation split over ranks
    ds = resolve_deepspeed_config(_cfg(sequence_parallel_size=2, micro_batch_size=2), world_size=2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["sequence_parallel_size"] == 2
