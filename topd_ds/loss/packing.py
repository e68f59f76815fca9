"""Rollouts and their probe windows packed into one student forward (TOPD's shared prefixes, paper Sec 3).

Row b of a packed micro-batch holds rollout b, then the student probe windows of rollout b's divergent
points, each without its last token (K - 1 tokens; the last one is only a target):

    [ x_0 ... x_{L-1} | s^1_0 ... s^1_{K-2} | s^2_0 ... s^2_{K-2} | ... | pad ]
    positions:  0 ... L-1    t_1 ... t_1+K-2       t_2 ... t_2+K-2

Attention: rollout tokens are causal among themselves (so the rollout's rows are exactly those of a plain
forward and give the OPD term); window m's token j attends to the rollout's x_<t_m and to its own tokens
s^m_<=j, never to another window. So window m's hidden state at j is the student's state on
x_<t_m + s^m_<=j, as in a separate forward on that prefix, while every prefix is computed once.
The student's distribution for window position j is read at: j = 0, rollout row t_m - 1 (context x_<t_m);
j >= 1, the row of s^m_{j-1}.

Why one packed forward (and not past key/values sliced at each t): under ZeRO-3 every forward is a collective,
and a single forward per micro-batch, whatever the number of windows, keeps every rank in step (docs/TRAINING.md,
"Uniform collectives in the objective"); a KV cache expanded to M windows would also hold M x L keys and values
per layer, while packing adds only M x (K - 1) tokens. The mask is built by transformers' own
`create_causal_mask` with an extra mask function, so it comes out in the form the model's attention
implementation wants (sdpa / eager: a dense (B, 1, T, T) mask; flex_attention: a BlockMask). flash_attention_2
takes no custom mask and is refused.

Memory (B rows of rollouts of length <= L, M windows in all, window size K): ids/positions (B, L + M K) int64;
the dense mask (B, 1, L + M K, L + M K) bool (sdpa) -- 0.3 GB at L = 9.7k, M = 150, K = 50 -- or a BlockMask.
"""

import dataclasses

import torch

from topd_ds.errors import ConfigError


@dataclasses.dataclass
class Packed:
    ids: torch.Tensor         # (B, Tp) token ids, pad_id after each row's end
    positions: torch.Tensor   # (B, Tp) rotary positions (rollout: 0..L-1; window m: t_m + j)
    real: torch.Tensor        # (B, Tp) bool, False on padding
    segment: torch.Tensor     # (B, Tp) 0 for rollout and padding tokens, m + 1 for window m's tokens
    cut: torch.Tensor         # (B, Tp) window tokens: t_m (they see rollout keys < t_m); others: Tp
    window_rows: torch.Tensor  # (M, K) flat row b * Tp + p whose hidden state predicts window token j

    def to(self, device) -> "Packed":
        return Packed(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def pack(sequences, window_seq, window_pos, window_ids, window_mask, *, pad_id: int) -> Packed:
    """Pack `sequences` (B lists of ids) with the windows of their divergent points.

    window_seq (M,) int: which of the B sequences (local index); window_pos (M,) int: t, the window replaces
    token t; window_ids (M, K) int; window_mask (M, K) bool, a prefix mask (False after an early EOS).
    """
    B, M = len(sequences), int(window_seq.numel())
    K = int(window_ids.shape[1]) if M else 0
    n_valid = window_mask.sum(1).tolist() if M else []
    if M and bool((window_mask.long().diff(dim=1) > 0).any()):
        raise ValueError("window_mask: must be True then False along each window (a prefix mask)")
    rows_ids = [list(s) for s in sequences]
    rows_pos = [list(range(len(s))) for s in sequences]
    rows_seg = [[0] * len(s) for s in sequences]
    rows_cut = [[None] * len(s) for s in sequences]
    starts = []
    for m in range(M):
        b, t, n = int(window_seq[m]), int(window_pos[m]), int(n_valid[m])
        if not 0 < t < len(sequences[b]) + 1:
            raise ValueError(f"window_pos[{m}]: {t} outside sequence {b} (length {len(sequences[b])})")
        starts.append(len(rows_ids[b]))
        body = window_ids[m, :max(n - 1, 0)].tolist()  # the last valid token is only a target
        rows_ids[b] += body
        rows_pos[b] += list(range(t, t + len(body)))
        rows_seg[b] += [m + 1] * len(body)
        rows_cut[b] += [t] * len(body)
    Tp = max(len(r) for r in rows_ids)
    ids = torch.full((B, Tp), pad_id, dtype=torch.long)
    positions = torch.zeros(B, Tp, dtype=torch.long)
    real = torch.zeros(B, Tp, dtype=torch.bool)
    segment = torch.zeros(B, Tp, dtype=torch.long)
    cut = torch.full((B, Tp), Tp, dtype=torch.long)
    for b in range(B):
        n = len(rows_ids[b])
        ids[b, :n] = torch.tensor(rows_ids[b])
        positions[b, :n] = torch.tensor(rows_pos[b])
        positions[b, n:] = torch.arange(n, Tp)  # padding: any increasing positions (never attended to)
        real[b, :n] = True
        segment[b, :n] = torch.tensor(rows_seg[b])
        cut[b, :n] = torch.tensor([Tp if c is None else c for c in rows_cut[b]])
    window_rows = torch.zeros(M, K, dtype=torch.long)
    for m in range(M):
        b, t = int(window_seq[m]), int(window_pos[m])
        first = b * Tp + t - 1                                    # context x_<t: the rollout's row t - 1
        rows = [first] + [b * Tp + starts[m] + j for j in range(K - 1)]
        # masked window positions carry no loss: point them at a real row
        window_rows[m] = torch.tensor([r if j < max(int(n_valid[m]), 1) else first for j, r in enumerate(rows)])
    return Packed(ids, positions, real, segment, cut, window_rows)


def window_mask_function(packed: Packed):
    """mask_mod(b, h, q, kv) -> bool, AND-ed with the causal mask: rollout queries see the rollout only;
    window queries see rollout keys < t of their point and their own window."""
    segment, cut = packed.segment, packed.cut

    def allowed(batch_idx, head_idx, q_idx, kv_idx):
        seg_q, seg_k = segment[batch_idx, q_idx], segment[batch_idx, kv_idx]
        to_rollout = (seg_k == 0) & (kv_idx < cut[batch_idx, q_idx])
        return to_rollout | ((seg_k == seg_q) & (seg_q > 0))
    return allowed


def attention_mask(config, packed: Packed, dtype: torch.dtype):
    """The packed rows' attention mask in the form of config._attn_implementation (see the module docstring)."""
    from transformers.masking_utils import create_causal_mask

    impl = getattr(config, "_attn_implementation", "sdpa")
    if impl is not None and impl.startswith("flash_attention"):
        raise ConfigError(f"model attn_implementation: {impl} cannot take the TOPD window mask; "
                          f"use sdpa or flex_attention")
    B, Tp = packed.ids.shape
    shape_only = torch.empty(B, Tp, 0, dtype=dtype, device=packed.ids.device)  # batch, length, dtype: no data
    return create_causal_mask(config=config, inputs_embeds=shape_only, attention_mask=packed.real, cache=None,
                              position_ids=packed.positions, and_mask_function=window_mask_function(packed),
                              allow_is_causal_skip=False)
