"""Ground cost between teacher and student token windows (paper Sec 3: C_ij = c(x^T_{t+i}, x^S_{t+j})).

Convention used across topd-ds: rows are TEACHER window positions i, columns are STUDENT window positions j.

    table = cost_table(embedding, device)                      # once: unit rows on the trainer's device
    cost = token_cost(table, teacher_ids, student_ids)       # (B, n, m) float32 on the table's device
    cost = cost + position_cost(n, m, weight, cost.device)    # optional: prefer same-position matches

The cost is computed where the table lives, and the solver runs where the cost lives (the fused Triton kernel
on CUDA), so a table on the trainer's GPU keeps the whole OT there; ids and masks may stay on the CPU.
Only the embedding rows the windows use are gathered (once per distinct token id), so a bf16 table of a
150k-token vocabulary is never upcast whole; the gathered rows are normalised in float32.
Variable window lengths (a continuation stopping at EOS) are not handled here: pad the ids with any valid
token and pass `mask_a` / `mask_b` to the solver, which gives padded positions no mass.
"""

import torch

from topd_ds.errors import ConfigError

METRICS = ("cosine", "sqeuclidean")


def cost_table(embedding: torch.Tensor, device: torch.device | str, *, chunk_rows: int = 16384) -> torch.Tensor:
    """The ground cost's table on `device`: rows normalised to unit length, float32. (V, D) -> (V, D).

    Built chunk by chunk on the device, so a bf16 table is never upcast whole anywhere. Allocates V D 4 bytes
    on the device (Qwen3-30B-A3B's 151,936 x 2048: 1.24 GB) plus one chunk; `token_cost` on it gives the same
    costs as on the raw table (its own normalisation of unit rows changes them by rounding only).
    """
    if embedding.dim() != 2:
        raise ValueError(f"embedding: expected (V, D), got shape {tuple(embedding.shape)}")
    V, D = embedding.shape
    out = torch.empty(V, D, dtype=torch.float32, device=device)
    for lo in range(0, V, chunk_rows):
        rows = embedding[lo:lo + chunk_rows].to(device=device).float()  # (chunk, D)
        out[lo:lo + chunk_rows] = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return out


def token_cost(
    embedding: torch.Tensor,
    ids_a: torch.Tensor,
    ids_b: torch.Tensor,
    *,
    metric: str = "cosine",
) -> torch.Tensor:
    """Batched ground cost between two windows of token ids.

    cosine:       C_ij = 1 - <e_i, e_j> / (|e_i| |e_j|)          in [0, 2]
    sqeuclidean:  C_ij = | e_i/|e_i| - e_j/|e_j| |^2 = 2 (1 - cos) in [0, 4]

    Args:
        embedding: (V, D) table, any float dtype (bf16 fine), any device.
        ids_a: (B, n) long, teacher window token ids (rows of the cost).
        ids_b: (B, m) long, student window token ids (columns of the cost).
        metric: "cosine" or "sqeuclidean".
    Returns:
        (B, n, m) float32 on the embedding's device. Identical tokens cost exactly 0.

    Example:
        >>> e = torch.eye(3)
        >>> token_cost(e, torch.tensor([[0, 1]]), torch.tensor([[1, 1, 2]]))
        tensor([[[1., 1., 1.],
                 [0., 0., 1.]]])
    """
    if metric not in METRICS:
        raise ConfigError(f"ot.metric: expected one of {METRICS}, got {metric!r}")
    if embedding.dim() != 2:
        raise ValueError(f"embedding: expected (V, D), got shape {tuple(embedding.shape)}")
    if ids_a.dim() != 2 or ids_b.dim() != 2 or ids_a.shape[0] != ids_b.shape[0]:
        raise ValueError(f"ids_a, ids_b: expected (B, n) and (B, m), got {tuple(ids_a.shape)} and {tuple(ids_b.shape)}")
    V = embedding.shape[0]
    device = embedding.device
    ids_a = ids_a.to(device=device, dtype=torch.long)
    ids_b = ids_b.to(device=device, dtype=torch.long)
    B, n = ids_a.shape
    m = ids_b.shape[1]
    if B == 0 or n == 0 or m == 0:
        return torch.zeros(B, n, m, dtype=torch.float32, device=device)
    lo = torch.minimum(ids_a.min(), ids_b.min())
    hi = torch.maximum(ids_a.max(), ids_b.max())
    if bool(lo < 0) or bool(hi >= V):
        raise ValueError(f"ids_a/ids_b: token ids must lie in [0, {V}), got range [{int(lo)}, {int(hi)}]")

    # Gather each distinct token once, upcast and normalise only those rows.
    uniq, inverse = torch.unique(torch.cat([ids_a.reshape(-1), ids_b.reshape(-1)]), return_inverse=True)
    rows = embedding.index_select(0, uniq).float()  # (U, D)
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    inv_a = inverse[: B * n].view(B, n)
    inv_b = inverse[B * n :].view(B, m)
    U = uniq.numel()
    if U * U <= 4 * B * n * m:
        # Few distinct tokens (short windows, repeated tokens): one Gram matrix, then index it.
        gram = rows @ rows.T  # (U, U)
        cos = gram[inv_a[:, :, None], inv_b[:, None, :]]  # (B, n, m)
    else:
        cos = torch.bmm(rows[inv_a], rows[inv_b].transpose(1, 2))  # (B, n, D) @ (B, D, m) -> (B, n, m)
    cost = (1.0 - cos).clamp_(0.0, 2.0)
    # Same token -> exactly zero cost (rounding in the dot product would leave ~1e-7).
    cost = cost.masked_fill(inv_a[:, :, None] == inv_b[:, None, :], 0.0)
    if metric == "sqeuclidean":
        cost = 2.0 * cost
    return cost.contiguous()


def position_cost(n: int, m: int, weight: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """An order-aware term for the ground cost (beyond the paper; `topd.position_cost`): (n, m) float32,
    weight |i - j| / max(n, m) between teacher position i and student position j, 0 on the diagonal.

    OT on token costs alone ignores order: a token may be matched to the same or a similar token anywhere in
    the other window, so L_traj's target at student position j mixes tokens of other positions (docs/LOSSES.md,
    "Trajectory targets"). With weight w a match d positions away costs w d / K more: at w = 1 and K = 16 one
    position of shift costs 0.06, small against the cosine cost of two unrelated tokens (about 1), so identical
    tokens a few positions apart (a shifted but re-converging window) still match each other.

        >>> position_cost(2, 3, 1.0)
        tensor([[0.0000, 0.3333, 0.6667],
                [0.3333, 0.0000, 0.3333]])
    """
    i = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    j = torch.arange(m, device=device, dtype=torch.float32)[None, :]
    return weight * (i - j).abs() / max(n, m, 1)
