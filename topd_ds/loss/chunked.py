"""Row-chunked autograd for per-token losses over a large vocabulary.

A per-token loss over the vocabulary (reverse KL, forward KL, soft-target cross-entropy) needs, for
every token row, a few fp32 vectors of size V (log-softmax of student and teacher, their exp, the
difference). Plain autograd keeps them all alive until backward: at V = 152k and T = 16k that is
~10 GB per saved (T, V) fp32 tensor. `chunked_rows` evaluates a row function chunk by chunk:

* forward runs under no_grad, one chunk of `chunk_size` rows at a time, and keeps only the inputs
  (which the caller holds anyway) and the row indices;
* backward recomputes each chunk with grad enabled, takes `torch.autograd.grad` of that chunk, and
  accumulates into the input gradients (index_put_ for row tensors, a sum for shared tensors such
  as an lm_head weight).

So the extra memory is O(chunk_size * V) transient plus O(n) saved, whatever T is. With
`chunk_size=None` the same row function runs once under ordinary autograd (the reference path the
tests compare against). Row tensors are indexed as `x[batch_idx, pos]` on their (B, T, ...) form,
which never copies a whole non-contiguous slice such as `logits[:, :-1]`.

Not supported: double backward through the chunked path (the recomputation is not itself tracked).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

RowFn = Callable[..., torch.Tensor]


class _ChunkedRows(torch.autograd.Function):
    """forward(row_fn, batch_idx, pos, chunk_size, n_row, *tensors) -> (n,) per-row values."""

    @staticmethod
    def forward(ctx, row_fn, batch_idx, pos, chunk_size, n_row, *tensors):  # type: ignore[override]
        rows, shared = tensors[:n_row], tensors[n_row:]
        outs = []
        for start in range(0, batch_idx.numel(), chunk_size):
            b, p = batch_idx[start:start + chunk_size], pos[start:start + chunk_size]
            outs.append(row_fn(*[x[b, p] for x in rows], *shared))  # each (c,)
        ctx.row_fn, ctx.chunk_size, ctx.n_row = row_fn, chunk_size, n_row
        ctx.save_for_backward(batch_idx, pos, *tensors)
        if not outs:  # no selected rows: an empty result of the right dtype
            return torch.zeros(0, dtype=_out_dtype(tensors), device=batch_idx.device)
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        batch_idx, pos, *tensors = ctx.saved_tensors
        n_row = ctx.n_row
        need = ctx.needs_input_grad[5:]
        # a shared tensor's (lm_head weight's) gradient sums over every chunk: accumulate it in fp32, not bf16
        grads: list[torch.Tensor | None] = [
            (torch.zeros_like(t, dtype=torch.float32) if i >= n_row and t.dtype in (torch.float16, torch.bfloat16)
             else torch.zeros_like(t)) if n else None
            for i, (t, n) in enumerate(zip(tensors, need))]
        if not any(need):
            return (None,) * (5 + len(tensors))
        for start in range(0, batch_idx.numel(), ctx.chunk_size):
            b, p = batch_idx[start:start + ctx.chunk_size], pos[start:start + ctx.chunk_size]
            with torch.enable_grad():
                ins = [x.detach()[b, p] for x in tensors[:n_row]] + [x.detach() for x in tensors[n_row:]]
                for x, n in zip(ins, need):
                    if n:
                        x.requires_grad_(True)
                out = ctx.row_fn(*ins)  # (c,)
                wrt = [x for x, n in zip(ins, need) if n]
                got = iter(torch.autograd.grad(out, wrt, grad_out[start:start + ctx.chunk_size],
                                               allow_unused=True))
            for i, n in enumerate(need):
                if not n:
                    continue
                g = next(got)
                if g is None:
                    continue
                if i < n_row:
                    grads[i].index_put_((b, p), g.to(grads[i].dtype), accumulate=True)
                else:
                    grads[i].add_(g.to(grads[i].dtype))
        grads = [g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, tensors)]
        return (None, None, None, None, None, *grads)


def _out_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return torch.float64 if torch.float64 in floats else torch.float32


def chunked_rows(row_fn: RowFn, rows: Sequence[torch.Tensor], shared: Sequence[torch.Tensor],
                 mask: torch.Tensor, *, chunk_size: int | None) -> torch.Tensor:
    """Apply `row_fn` to the rows selected by `mask` and scatter the result back to (B, T).

    row_fn(*row_chunks, *shared) -> (c,) where each row chunk is `x[batch_idx, pos]` of shape (c, ...).
    rows:   tensors of shape (B, T, ...) (logits, hidden states, target ids, top-k ids ...).
    shared: tensors used whole by every chunk (lm_head weights).
    mask:   (B, T) bool, the rows to evaluate; the rest of the output is exactly 0.
    chunk_size: rows per chunk (>= 1), or None for one plain-autograd evaluation of all rows.
    Returns (B, T) in float32, or float64 when any input is float64.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask: expected (B, T), got shape {tuple(mask.shape)}")
    for i, x in enumerate(rows):
        if tuple(x.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"rows[{i}]: leading shape {tuple(x.shape[:2])} != mask shape {tuple(mask.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 or None, got {chunk_size}")
    batch_idx, pos = mask.nonzero(as_tuple=True)  # (n,), (n,)
    if chunk_size is None:
        vals = row_fn(*[x[batch_idx, pos] for x in rows], *shared) if batch_idx.numel() else None
    else:
        vals = _ChunkedRows.apply(row_fn, batch_idx, pos, chunk_size, len(rows), *rows, *shared)
    dtype = _out_dtype(list(rows) + list(shared))
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # (B, T)
    if vals is None or vals.numel() == 0:
        # keep the graph connected so callers can always call backward on a sum of the result
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        anchor = sum((x.sum() * 0 for x in list(rows) + list(shared) if x.requires_grad), zero)
        return out + anchor
    return out.index_put((batch_idx, pos), vals.to(dtype))
