"""Reference objective for the tests: the direct implementation of topd_ds/loss/objective.py as it was before the
shared-prefix trajectory term and the hidden-state losses (issue 16). Every term from full (B, T, V) student
logits; the trajectory term from one extra forward per divergent point on prefix x_<t + window. Production
code must give the same losses and gradients."""

import torch

from topd_ds.rollout import divergence
from topd_ds.loss import losses
from topd_ds.data import pad_batch


def _response_grid(batch_seqs, prompt_lens, per_token_rows, pad_value=0.0):
    """Scatter per-response-token rows (R_b, ...) into the (B, T-1, ...) logits grid (row t-1 for token t)."""
    B, T = len(batch_seqs), max(len(s) for s in batch_seqs)
    first = per_token_rows[0]
    out = torch.full((B, T - 1) + tuple(first.shape[1:]), pad_value, dtype=first.dtype)
    for b, (rows, p) in enumerate(zip(per_token_rows, prompt_lens)):
        out[b, p - 1:p - 1 + len(rows)] = rows
    return out


def response_mask(sequences, prompt_lens) -> torch.Tensor:
    """(B, T-1) bool: logits rows that predict a response token."""
    B, T = len(sequences), max(len(s) for s in sequences)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        mask[b, p - 1:len(s) - 1] = True
    return mask


def student_logits(model, sequences, pad_id: int, device):
    ids, attn = pad_batch(sequences, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
    return logits[:, :-1], ids  # a view: the losses upcast chunk by chunk, never the whole (B, T, V)


def opd_per_token(logits, batch, idx, *, estimator: str, teacher_head, chunk_size: int):
    """Reverse KL(p_S || p_T) per logits row (B, T-1) for the sequences `idx` of the batch.

    Returns (loss, value, mask): `loss` carries the gradient; `value` is the per-token KL estimate used to
    rank and cap tokens (the same numbers for full/top-k; for the sampled estimator the loss is a
    policy-gradient surrogate whose value is not the KL)."""
    seqs = [batch.sequences[i] for i in idx]
    plens = [batch.prompt_lens[i] for i in idx]
    mask = response_mask(seqs, plens).to(logits.device)
    if estimator == "full":
        hidden = _response_grid(seqs, plens, [batch.teacher_hidden[i] for i in idx]).to(logits.device)
        per = losses.reverse_kl_from_hidden(logits, hidden, teacher_head.to(logits.device), mask,
                                            chunk_size=chunk_size)
        value = per.detach()
    elif estimator == "topk":
        ids = _response_grid(seqs, plens, [batch.teacher_topk_ids[i] for i in idx], 0).long().to(logits.device)
        lps = _response_grid(seqs, plens, [batch.teacher_topk_logprobs[i] for i in idx]).to(logits.device)
        per = losses.reverse_kl_topk(logits, ids, lps, mask, chunk_size=chunk_size)
        value = per.detach()
    else:  # sampled-token estimator as a policy-gradient loss with reward -(log p_S - log p_T)
        targets = torch.zeros(mask.shape, dtype=torch.long)
        for b, s in enumerate(seqs):
            targets[b, :len(s) - 1] = torch.tensor(s[1:])
        s_lp = torch.log_softmax(logits, -1).gather(-1, targets.to(logits.device)[..., None])[..., 0]
        t_lp = _response_grid(seqs, plens, [batch.teacher_token_logprobs[i] for i in idx]).to(logits.device)
        value = losses.reverse_kl_sampled(s_lp.detach(), t_lp, mask)
        per = losses.sampled_token_pg_loss(s_lp, -value, mask)
    return per, value, mask


def mark_grid(batch, idx, shape) -> torch.Tensor:
    """(B, T-1) bool of tokens to cap, from the pipeline's per-response-token marks."""
    marked = torch.zeros(shape, dtype=torch.bool)
    if batch.marked is None:
        return marked
    for b, i in enumerate(idx):
        p = batch.prompt_lens[i]
        m = batch.marked[i]
        marked[b, p - 1:p - 1 + len(m)] = m
    return marked


def trajectory_term(model, batch, idx, *, pad_id: int, device, chunk_size: int):
    """(L_traj, n_windows) over the real divergent points of sequences `idx`: one extra student forward on
    each prefix x_<t followed by the student's K-token probe window (its contexts c_{t+j}).

    Every rank runs this forward and its backward, also with no divergent point in its micro-batch: under
    ZeRO-3 a forward all-gathers the parameters layer by layer and a backward reduce-scatters the gradients,
    so a rank that skipped them would leave its peers waiting in those collectives forever. Without a local
    window it runs one zero-weight dummy window (a fully masked one-token row): loss exactly 0, gradients 0."""
    w = batch.windows
    local = (torch.isin(w.seq_index, torch.tensor(idx, dtype=w.seq_index.dtype))
             if w is not None else torch.zeros(0, dtype=torch.bool))
    sel = local.nonzero(as_tuple=True)[0]
    if sel.numel() == 0:
        # the dummy: the first local sequence's first token, a 1-token window masked out
        logits, _ = student_logits(model, [batch.sequences[idx[0]][:1] * 2], pad_id, device)  # (1, 1, V)
        empty_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        weights = torch.zeros(1, 1, 1, dtype=torch.float32, device=device)
        traj = losses.trajectory_loss(logits, weights, empty_ids, torch.zeros(1, 1, dtype=torch.bool, device=device),
                                      reduction="mean", chunk_size=chunk_size)
        return traj, 0
    k = w.student_ids.shape[1]
    rows, starts = [], []
    for m in sel.tolist():
        prefix = batch.sequences[int(w.seq_index[m])][:int(w.position[m])]
        window = w.student_ids[m][w.student_mask[m]].tolist()
        rows.append(prefix + window)
        starts.append(len(prefix) - 1)  # logits row that predicts window token 0
    logits, _ = student_logits(model, rows, pad_id, device)  # (M, L-1, V)
    gather = torch.tensor(starts)[:, None] + torch.arange(k)[None, :]          # (M, K)
    gather = gather.clamp_max(logits.shape[1] - 1).to(device)
    win_logits = logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1]))  # (M, K, V)
    weights = losses.trajectory_soft_targets(w.plan[sel], w.teacher_ids[sel], w.teacher_mask[sel],
                                             w.student_mask[sel]).to(device)
    traj = losses.trajectory_loss(win_logits, weights, w.teacher_ids[sel].to(device),
                                  w.student_mask[sel].to(device), reduction="mean", chunk_size=chunk_size)
    return traj, len(rows)


def stage2_loss(model, batch, idx, *, cfg, teacher_head, pad_id: int, device):
    """(loss, terms) for the sequences `idx` of a pipeline batch under cfg.topd.mode."""
    logits, _ = student_logits(model, [batch.sequences[i] for i in idx], pad_id, device)
    per, value, mask = opd_per_token(logits, batch, idx, estimator=cfg.opd.estimator, teacher_head=teacher_head,
                                     chunk_size=cfg.opd.chunk_size)
    terms = {"loss/opd_raw": float(losses.reduce_loss(value, mask, reduction=cfg.opd.reduction))}
    if cfg.topd.mode != "opd":
        marked = mark_grid(batch, idx, mask.shape).to(per.device)
        # paper Sec 5.1: marked tokens' loss capped at the sample median, as a detached scale so the
        # capped token keeps its gradient direction (for the sampled estimator: scaled by its KL estimate)
        per = torch.where(mask, per * divergence.median_cap_scale(value, mask, marked), 0.0)
        terms["tokens/capped"] = int(marked.sum())
    loss = losses.reduce_loss(per, mask, reduction=cfg.opd.reduction)
    terms["loss/opd"] = float(loss.detach())
    if cfg.topd.mode == "topd":
        # always, also without a local divergent point (then a zero-weight dummy): see trajectory_term
        traj, n = trajectory_term(model, batch, idx, pad_id=pad_id, device=device, chunk_size=cfg.opd.chunk_size)
        terms["tokens/traj_windows"] = n
        if n:
            terms["loss/traj"] = float(traj.detach())
        loss = losses.topd_loss(loss, traj, lam=cfg.topd.lam)
    terms["loss/total"] = float(loss.detach())
    return loss, terms


def stage1_loss(model, sequences, prompt_lens, teacher_hidden, *, cfg, teacher_head, pad_id: int, device):
    """Forward KL(p_T || p_S) mixed with CE on the teacher's sampled tokens by kd_ratio (paper stage 1)."""
    logits, ids = student_logits(model, sequences, pad_id, device)
    mask = response_mask(sequences, prompt_lens).to(device)
    teacher_logits = None  # kd_ratio 0 (pure CE, e.g. the ground-truth control) needs no teacher
    if teacher_hidden is not None:
        hidden = _response_grid(sequences, prompt_lens, teacher_hidden).to(device)
        teacher_logits = hidden @ teacher_head.to(device).T                     # (B, T-1, V)
    targets = ids[:, 1:]
    per = losses.forward_kl_ce(logits, teacher_logits, targets, mask, kd_ratio=cfg.kd.kd_ratio,
                               temperature=cfg.kd.temperature)
    loss = losses.reduce_loss(per, mask, reduction=cfg.opd.reduction)
    return loss, {"loss/kd": float(loss.detach())}
