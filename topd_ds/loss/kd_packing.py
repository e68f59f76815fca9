"""Stage-1 sample packing: several (prompt, teacher response) samples in one row, attention kept per sample.

    rows = pack_samples(sequences, prompt_lens, teacher_hidden, pack_to=16384, pad_id=0)
    hidden = model(input_ids=rows.ids, position_ids=rows.positions, attention_mask=None, use_cache=False)
    per = forward_kl_ce_from_hidden(hidden, w, rows.teacher_hidden, t_w, rows.targets, rows.mask)  # (R, T)
    loss = reduce_packed(per, rows, reduction="token")

A row holds samples end to end, each with position_ids 0, 1, ..., len - 1:

    ids        [ a_0 ... a_6 | b_0 ... b_4 | pad pad ]
    positions    0  ...  6     0  ...  4      0   1      (padding restarts at 0 too: a "sample" of its own)

transformers (>= 4.53; checked on 5.24 by tests/test_kd_packing.py) reads position_ids that restart at 0, with
`attention_mask=None` and no KV cache (`use_cache=False`), as packed sequences: create_causal_mask
(masking_utils.find_packed_sequence_indices) ANDs the causal mask with "same sample" for sdpa, eager and
flex_attention, and flash_attention_2 runs varlen from the same position_ids. So each sample's hidden states are
those of its own forward, and its loss is the unpacked one. Row p predicts token p + 1 of the same sample; the
row of a sample's last token predicts nothing (it would predict the next sample's first token) and is masked.

Samples go to rows first-fit in the given order (deterministic, so a resumed run packs the same rows); a sample
longer than `pack_to` gets a row of its own. `pack_to = 0`: one sample per row (no packing). `one_row`: every
sample in one row (B = 1), for sequence parallelism (DeepSpeed's Ulysses wrapper is registered for a fixed batch
size, and with attention kept per sample a row boundary means nothing). `multiple`: rows padded to a multiple of
it (the sequence-parallel size: each rank takes T / sp rows).

Memory: ids / positions / targets / sample (R, T) int64, mask (R, T) bool, teacher hidden states (R, T, Ht) in
their dtype; sdpa builds a dense (R, 1, T, T) bool mask per forward (flash_attention_2 none).
"""

import dataclasses

import torch


@dataclasses.dataclass
class KDRows:
    ids: torch.Tensor        # (R, T) token ids, pad_id on padding
    positions: torch.Tensor  # (R, T) 0.. per sample (and per padding run)
    targets: torch.Tensor    # (R, T) the token row p predicts (0 where masked)
    mask: torch.Tensor       # (R, T) bool: row p predicts a response token of its own sample
    sample: torch.Tensor     # (R, T) index of the sample row p belongs to (-1 on padding)
    teacher_hidden: torch.Tensor | None  # (R, T, Ht) the teacher's state predicting the same token, 0 elsewhere
    n_samples: int
    max_len: int             # longest sample (the unpacked grid is n_samples x (max_len - 1) rows)

    def shard(self, rank: int, size: int) -> "KDRows":
        """Rows' tokens [rank T / size, (rank + 1) T / size) of every row (sequence parallelism)."""
        T = self.ids.shape[1]
        assert T % size == 0, f"row length {T} not a multiple of {size}"
        cut = slice(rank * (T // size), (rank + 1) * (T // size))
        th = None if self.teacher_hidden is None else self.teacher_hidden[:, cut]
        return KDRows(self.ids[:, cut], self.positions[:, cut], self.targets[:, cut], self.mask[:, cut],
                      self.sample[:, cut], th, self.n_samples, self.max_len)

    def to(self, device) -> "KDRows":
        th = None if self.teacher_hidden is None else self.teacher_hidden.to(device)
        return KDRows(self.ids.to(device), self.positions.to(device), self.targets.to(device),
                      self.mask.to(device), self.sample.to(device), th, self.n_samples, self.max_len)


def assign_rows(lengths, pack_to: int, *, one_row: bool = False) -> list[list[int]]:
    """Sample indices per row: first-fit in order into rows of <= pack_to tokens (0: one sample per row)."""
    if one_row:
        return [list(range(len(lengths)))]
    if pack_to <= 0:
        return [[i] for i in range(len(lengths))]
    rows, used = [], []
    for i, n in enumerate(lengths):
        for r, u in enumerate(used):
            if u + n <= pack_to:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def pack_samples(sequences, prompt_lens, teacher_hidden=None, *, pack_to: int, pad_id: int,
                 one_row: bool = False, multiple: int = 1) -> KDRows:
    """Pack `sequences` (lists of ids; sample b's response starts at prompt_lens[b]) into rows.

    teacher_hidden: None, or per sample a (len_b - P_b, Ht) tensor whose row j is the teacher's state predicting
    response token j (as Stage1Data.batch returns them)."""
    lengths = [len(s) for s in sequences]
    layout = assign_rows(lengths, pack_to, one_row=one_row)
    T = max(sum(lengths[i] for i in row) for row in layout)
    T = -(-T // multiple) * multiple
    R = len(layout)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    positions = torch.zeros(R, T, dtype=torch.long)
    targets = torch.zeros(R, T, dtype=torch.long)
    mask = torch.zeros(R, T, dtype=torch.bool)
    sample = torch.full((R, T), -1, dtype=torch.long)
    th = None
    if teacher_hidden is not None:
        first = teacher_hidden[0]
        th = torch.zeros(R, T, first.shape[-1], dtype=first.dtype)
    for r, row in enumerate(layout):
        at = 0
        for b in row:
            s, p, n = sequences[b], prompt_lens[b], lengths[b]
            ids[r, at:at + n] = torch.tensor(s)
            positions[r, at:at + n] = torch.arange(n)
            targets[r, at:at + n - 1] = torch.tensor(s[1:])
            mask[r, at + p - 1:at + n - 1] = True  # rows p-1 .. n-2 predict the response tokens p .. n-1
            sample[r, at:at + n] = b
            if th is not None:
                th[r, at + p - 1:at + n - 1] = teacher_hidden[b]
            at += n
        positions[r, at:] = torch.arange(T - at)  # padding: a sample of its own, never attended to by real tokens
    return KDRows(ids, positions, targets, mask, sample, th, len(sequences), max(lengths))


def reduce_packed(per_token: torch.Tensor, rows: KDRows, *, reduction: str = "token", group=None) -> torch.Tensor:
    """losses.reduce_loss of the unpacked samples, from packed rows (R, T) -- or from one sequence-parallel shard.

    Per-sample sums S_b and counts C_b; token: sum S / sum C; sequence: mean over samples with C_b > 0 of
    S_b / C_b; batch: sum S / (n_samples (max_len - 1)), the unpacked grid's size. With `group` (the
    sequence-parallel group) the counts are all-reduced over it, so this rank's value is its shard's share and
    the shares sum to the full loss: every form is linear in the S_b, and each rank's S_b are its own tokens'.
    The counts carry no gradient, so the all-reduce is outside autograd."""
    from topd_ds.errors import ConfigError

    m = rows.mask
    x = torch.where(m, per_token, 0.0)
    idx = rows.sample.clamp_min(0).reshape(-1)
    sums = torch.zeros(rows.n_samples, dtype=x.dtype, device=x.device).index_add(0, idx, x.reshape(-1))
    counts = torch.zeros(rows.n_samples, dtype=x.dtype, device=x.device).index_add(
        0, idx, m.reshape(-1).to(x.dtype))
    if group is not None:
        torch.distributed.all_reduce(counts, group=group)
    if reduction == "token":
        return sums.sum() / counts.sum().clamp_min(1)
    if reduction == "sequence":
        return (sums / counts.clamp_min(1)).sum() / (counts > 0).sum().clamp_min(1)
    if reduction == "batch":
        return sums.sum() / float(rows.n_samples * max(rows.max_len - 1, 1))
    raise ConfigError(f"opd.reduction: expected token, sequence or batch, got {reduction!r}")
