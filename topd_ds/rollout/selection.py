"""Selection scores from the teacher's hidden states on the training device, chunked over rows and vocab.

The high-loss candidates are picked by a per-token reverse KL restricted to the student's top-k
(pipeline.selection_score), which needs the teacher's logprob of those k ids at every response position:
log p_T(v | t) = h_t . W_v - logsumexp_u h_t . W_u. At the paper's shapes that is a (40k x 2048) @
(2048 x 152k) product per step (2.5e13 FLOP): minutes on rank 0's CPU, well under a second on its GPU.

With `teacher.scoring: local` the teacher's hidden states never leave the trainer's ranks, so the pipeline asks
the teacher server for its top-k instead and `teacher_logprobs_from_topk` fills in the student's ids from it
(exact wherever a student id is in the teacher's top-k, the teacher's k-th logprob as a floor elsewhere; with
k = V exact everywhere). Why top-k and not SGLang's `token_ids_logprob`, at the paper's shapes (R = 9.7k
response tokens a rollout, 4 rollouts a step, k = opd.top_k = 20, V = 151,936; docs/SCALING.md section 5):
* token_ids_logprob is ONE id list per request, answered at every position: covering the student's top-k ids of
  a whole rollout means R x U entries for the union U of those ids over the rollout (an estimate, not measured:
  U ~ 2k gives 9.7k x 2k = 19M entries of ~35 B, more than today's 20M hidden floats of ~10 B);
* windows of W positions, one request each, cut U to U_W <= 20 W but send a prefix per window (W = 64: 152
  requests a rollout with 5k-token prefixes on average, ~4.6 MB of ids up, and U_W ~ 100 -> 0.97M entries
  down; W = 1: exactly k ids, but 9.7k requests a rollout and ~300 MB of prefix ids up);
* the teacher's top-20 is R x 20 = 194k entries a rollout, 776k a step, 8 bytes each as SGLang 0.5.23's flat
  base64 arrays (`return_flat_raw_top_logprobs_b64`): 8.3 MB a step in base64, decoded by np.frombuffer.
Top-k is the fewest bytes; what it costs is the floor where a student id falls outside the teacher's top-k
(measured on deque: docs/results/speed.md "Selection from the teacher's top-k").

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


def teacher_logprobs_from_topk(student_ids: torch.Tensor, teacher_ids: torch.Tensor,
                               teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """log p_T at the student's ids from the teacher's top-k: student_ids (R, k_s), teacher_ids / teacher_logprobs
    (R, k_t) -> (R, k_s). A student id in the teacher's top-k gets its logprob; one outside gets the teacher's
    smallest listed logprob (an upper bound on the true one, so the selection score is a lower bound there).
    Exact when k_t = V. Allocates (R, k_s, k_t) bools."""
    if student_ids.shape[0] != teacher_ids.shape[0] or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"shapes: student ids {tuple(student_ids.shape)}, teacher ids {tuple(teacher_ids.shape)}, "
                         f"teacher logprobs {tuple(teacher_logprobs.shape)}")
    match = student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)                    # (R, k_s, k_t)
    t_at = torch.where(match, teacher_logprobs.unsqueeze(-2), torch.inf).min(-1).values
    floor = teacher_logprobs.min(-1, keepdim=True).values.expand_as(t_at)           # (R, k_s)
    return torch.where(torch.isinf(t_at), floor, t_at)
