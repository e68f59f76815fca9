"""Stage-1 sequence parallelism (topd_ds/loss/sequence_parallel.py: DeepSpeed's own Ulysses) with sample packing: two
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
    torchrun.run_ranks("two_rank_sp.py", ["--student", tiny_models[1], "--out", out_file], world=2,
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
    from topd_ds.loss import sequence_parallel

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


def _reference_attention(q, k, v, lengths, groups):
    """float64 eager attention, block-diagonal causal over samples of `lengths` (an independent reference:
    its own mask from the lengths, its own softmax); q (B, H, T, D), k/v (B, H / groups, T, D) -> (B, T, H, D)."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    T = q.shape[2]
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (sample[:, None] == sample[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_packed_sdpa_is_block_diagonal_without_a_dense_mask(monkeypatch):
    """Finding 9 of issue 24: the Ulysses core built a dense (B, 1, T, T) bool mask per layer call (1.2 GB at
    34k tokens, and a 2.3 GB bf16 bias once SDPA leaves its flash kernel for it). Now each sample runs SDPA
    alone with is_causal: equal to a float64 block-diagonal reference (grouped-query heads, samples of length
    1 and more), and no SDPA call gets a mask or a key longer than the longest sample."""
    from types import SimpleNamespace

    from topd_ds.loss.sequence_parallel import packed_sdpa

    seed = 24
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 9, 3, 7]
    T, H, groups, D = sum(lengths), 4, 2, 8
    pos = torch.cat([torch.arange(n) for n in lengths])[None]          # (1, T), restarting per sample
    q = torch.randn(2, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, H // groups, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, H // groups, T, D, generator=g, dtype=torch.float64)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        calls.append((attn_mask, key.shape[2]))
        return real(query, key, value, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
    out, _ = packed_sdpa(module, q, k, v, None, position_ids=pos, scaling=D ** -0.5, dropout=0.0)
    want = _reference_attention(q, k, v, lengths, groups)
    assert out.shape == (2, T, H, D)
    assert torch.allclose(out, want, atol=1e-12), (seed, float((out - want).abs().max()))
    assert calls and all(mask is None for mask, _ in calls), "an SDPA call got a mask"
    assert max(n for _, n in calls) == max(lengths), calls
