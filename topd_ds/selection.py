"""Selection scores from the teacher's hidden states on the training device, chunked over rows and vocab.

The high-loss candidates are picked by a per-token reverse KL restricted to the student's top-k
(pipeline.selection_score), which needs the teacher's logprob of those k ids at every response position:
log p_T(v | t) = h_t . W_v - logsumexp_u h_t . W_u. At the paper's shapes that is a (40k x 2048) @
(2048 x 152k) product per step (2.5e13 FLOP): minutes on rank 0's CPU, well under a second on its GPU.

`teacher_logprobs_at_chunked` computes it on any device without a (T, V) tensor: rows in chunks of
`row_chunk`, the vocabulary in chunks of `vocab_chunk` with a running (max, sum) logsumexp, and the k
logits of the wanted ids as k dot products. It allocates (row_chunk, vocab_chunk) float32 for the logits
of one tile, (row_chunk, k, H) for the gathered head rows, and the (R, k) result; the head is used where it
lies (move it to the device once, outside). `pipeline.teacher_logprobs_at` (CPU, row chunks, whole
vocabulary) stays as the reference it is tested against.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 512        # positions per tile
VOCAB_CHUNK = 32768    # vocabulary entries per tile: 512 x 32768 float32 = 64 MB


def teacher_logprobs_at_chunked(hidden: torch.Tensor, head_weight: torch.Tensor, ids: torch.Tensor, *,
                                row_chunk: int = ROW_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """log p_T(ids | position) on head_weight's device: hidden (R, H), head_weight (V, H), ids (R, k) -> (R, k)
    float32 on that device. Memory: (row_chunk, vocab_chunk) + (row_chunk, k, H) float32 at a time, never (R, V)."""
    if hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"ids: {ids.shape[0]} rows, hidden has {hidden.shape[0]}")
    if hidden.shape[-1] != head_weight.shape[-1]:
        raise ValueError(f"hidden: width {hidden.shape[-1]} != head_weight's {head_weight.shape[-1]}")
    dev = head_weight.device
    w = head_weight if head_weight.dtype == torch.float32 else head_weight.float()
    V = w.shape[0]
    out = torch.empty(ids.shape, dtype=torch.float32, device=dev)
    for lo in range(0, hidden.shape[0], row_chunk):
        h = hidden[lo:lo + row_chunk].to(dev, torch.float32, non_blocking=True)       # (c, H)
        idx = ids[lo:lo + row_chunk].to(dev)                                           # (c, k)
        run_max = torch.full((h.shape[0], 1), -torch.inf, device=dev)                 # running logsumexp
        run_sum = torch.zeros((h.shape[0], 1), device=dev)
        for vlo in range(0, V, vocab_chunk):
            logits = h @ w[vlo:vlo + vocab_chunk].T                                    # (c, vc)
            m = torch.maximum(run_max, logits.amax(-1, keepdim=True))
            run_sum = run_sum * (run_max - m).exp() + (logits - m).exp().sum(-1, keepdim=True)
            run_max = m
        picked = torch.einsum("ch,ckh->ck", h, w[idx])                                 # (c, k)
        out[lo:lo + row_chunk] = picked - (run_max + run_sum.log())
    return out
