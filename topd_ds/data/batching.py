"""Batch padding: ragged token id lists -> (ids, mask) tensors."""


def pad_batch(seqs, pad_id: int, *, side: str = "right"):
    """Pad ragged id lists into (ids, mask), both LongTensor of shape (B, T_max); mask is 1 on real tokens.

    side="left" for generation (every prompt ends at the last column), "right" for training.
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side: must be 'left' or 'right', got {side!r}")
    seqs = [list(s) for s in seqs]
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    t_max = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t_max), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), t_max), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(t_max - len(s), t_max) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
