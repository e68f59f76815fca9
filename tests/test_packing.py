"""Packed rollouts + probe windows (topd_ds/loss/packing.py): each window token's hidden state equals the one of a
separate forward on its own prefix x_<t + window, under every attention implementation that takes the mask."""

import pytest
import torch

from topd_ds.loss import objective, packing
from topd_ds.errors import ConfigError
from topd_ds.tasks.models import build_model


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_window_rows_equal_separate_forwards(arch, impl):
    model = build_model(arch, seed=3, vocab_size=24, hidden=16, layers=2, heads=2).double()
    model.config._attn_implementation = impl
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 24, (n,), generator=g).tolist() for n in (9, 14)]
    # three windows: two on sequence 1 (one stopping early), one on sequence 0; K = 5
    seq, pos = torch.tensor([1, 0, 1]), torch.tensor([4, 7, 11])
    ids = torch.randint(3, 24, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    packed = packing.pack(seqs, seq, pos, ids, mask, pad_id=0)
    assert packed.ids.shape == (2, 14 + 4 + 2)  # sequence 1: 14 tokens + 4 + 2 window tokens
    with torch.no_grad():
        hidden = objective.student_hidden(model, packed, "cpu", windows=True)
        rows = hidden.reshape(-1, hidden.shape[-1])[packed.window_rows]  # (M, K, H)
        for m in range(3):
            t, n = int(pos[m]), int(mask[m].sum())
            ctx = seqs[int(seq[m])][:t] + ids[m, :n].tolist()
            ref = model(input_ids=torch.tensor([ctx]), output_hidden_states=True).hidden_states[-1][0]
            assert torch.allclose(rows[m, :n], ref[t - 1:t - 1 + n], atol=1e-10), (m, impl)
        # the rollouts' own rows are those of a plain forward (the OPD term reads them)
        for b, s in enumerate(seqs):
            ref = model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
            assert torch.allclose(hidden[b, :len(s)], ref, atol=1e-10)


def test_flash_attention_is_refused_with_the_key():
    model = build_model("qwen3", vocab_size=24, hidden=16, layers=1, heads=2)
    model.config._attn_implementation = "flash_attention_2"
    packed = packing.pack([[3, 4, 5]], torch.tensor([0]), torch.tensor([1]), torch.tensor([[6, 7]]),
                          torch.ones(1, 2, dtype=torch.bool), pad_id=0)
    with pytest.raises(ConfigError, match="attn_implementation"):
        packing.attention_mask(model.config, packed, torch.float32)


def test_non_prefix_window_mask_is_refused():
    with pytest.raises(ValueError, match="window_mask"):
        packing.pack([[3, 4, 5, 6]], torch.tensor([0]), torch.tensor([1]), torch.tensor([[6, 7, 8]]),
                     torch.tensor([[True, False, True]]), pad_id=0)
