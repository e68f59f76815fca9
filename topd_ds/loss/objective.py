"""The training objective of one micro-batch: ONE student forward + the loss terms of the configured mode.

Glue between a `pipeline.Batch` (or a stage-1 batch) and the pure functions of `losses`/`divergence`:

    opd             L = reduce(reverse KL per token)
    opd_dw_low_ot   false alarms (bottom-q D_OT high-loss tokens) capped at the sample's median loss
    opd_dw_high_ot  the same number of high-OT high-loss tokens capped instead (paper Table 2 control)
    topd            false alarms capped, plus lambda * L_traj on the real divergent points (paper Sec 3)

Memory at scale (docs/SCALING.md): the student runs once per micro-batch on its rollouts, with the probe
windows of their divergent points packed behind them (topd_ds/loss/packing.py: every window reuses its rollout's
prefix, so the term costs M x (K - 1) extra tokens, not M prefixes); the model returns final hidden states
(its lm_head is not applied), and every loss applies the lm_head chunk by chunk (topd_ds/loss/lm_head.py,
topd_ds/loss/chunked.py). No (T, V) logits tensor exists for a whole sequence, for the student or the teacher.

Collectives: whatever a rank's data, it runs one forward of the student, one LossHead call and one backward
per micro-batch, so ZeRO-3's gathers and reductions match on every rank (docs/TRAINING.md, "Uniform
collectives in the objective").

Positions: hidden row p predicts token p+1, so the response token at index t (prompt length P <= t < len) is
scored by row t-1; per-response-token tensors of the batch are indexed t - P.
"""

import torch

from topd_ds.rollout import divergence
from topd_ds.loss import losses, packing, traj_targets
from topd_ds.loss.lm_head import loss_head
from topd_ds.teacher.local import response_hidden as teacher_response_hidden, with_packed_hidden

_NO_LOGITS = torch.zeros(0, dtype=torch.long)  # logits_to_keep: the model applies its lm_head to no row


def _response_grid(batch_seqs, prompt_lens, per_token_rows, pad_value=0.0):
    """Scatter per-response-token rows (R_b, ...) into the (B, T-1, ...) row grid (row t-1 for token t)."""
    B, T = len(batch_seqs), max(len(s) for s in batch_seqs)
    first = per_token_rows[0]
    out = torch.full((B, T - 1) + tuple(first.shape[1:]), pad_value, dtype=first.dtype)
    for b, (rows, p) in enumerate(zip(per_token_rows, prompt_lens)):
        out[b, p - 1:p - 1 + len(rows)] = rows
    return out


def response_mask(sequences, prompt_lens) -> torch.Tensor:
    """(B, T-1) bool: rows that predict a response token."""
    B, T = len(sequences), max(len(s) for s in sequences)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        mask[b, p - 1:len(s) - 1] = True
    return mask


def _next_tokens(sequences, shape) -> torch.Tensor:
    """(B, T-1) int64: token p+1 of each sequence at row p (0 past the end)."""
    targets = torch.zeros(shape, dtype=torch.long)
    for b, s in enumerate(sequences):
        targets[b, :len(s) - 1] = torch.tensor(s[1:])
    return targets


def _model_dtype(model) -> torch.dtype:
    return next(getattr(model, "module", model).parameters()).dtype


def student_hidden(model, packed: packing.Packed, device, *, windows: bool) -> torch.Tensor:
    """Final (normed) hidden states (B, Tp, H) of the packed rows. The model's own lm_head is applied to no
    row (logits_to_keep = []); the losses apply it in chunks. `windows`: attend with the window mask
    (packing.attention_mask) rather than the plain causal + padding mask."""
    hf = getattr(model, "module", model)
    packed = packed.to(device)  # the mask (a dense tensor or a flex BlockMask) is built where it is used
    if windows:
        attn = packing.attention_mask(hf.config, packed, _model_dtype(model))
    else:
        attn = packed.real.long()
    out = model(input_ids=packed.ids, attention_mask=attn, position_ids=packed.positions,
                logits_to_keep=_NO_LOGITS.to(device), output_hidden_states=True)
    return out.hidden_states[-1]  # (B, Tp, H)


def _opd_terms(w, h, batch, idx, mask, *, estimator: str, teacher_head, chunk_size: int, teacher_hidden=None):
    """(per, value) for the rows h (B, T-1, H) of the sequences `idx` (see stage2_loss); `teacher_hidden`: the
    full estimator's per-sequence teacher states of `idx` (batch.teacher_hidden's, or the local teacher's)."""
    seqs = [batch.sequences[i] for i in idx]
    plens = [batch.prompt_lens[i] for i in idx]
    dev = h.device
    if estimator == "full":
        t_hidden = _response_grid(seqs, plens, teacher_hidden).to(dev)
        per = losses.reverse_kl_hidden_both(h, w, t_hidden, teacher_head.to(dev), mask, chunk_size=chunk_size)
        return per, per.detach()
    if estimator == "topk":
        ids = _response_grid(seqs, plens, [batch.teacher_topk_ids[i] for i in idx], 0).long().to(dev)
        lps = _response_grid(seqs, plens, [batch.teacher_topk_logprobs[i] for i in idx]).to(dev)
        per = losses.reverse_kl_topk_from_hidden(h, w, ids, lps, mask, chunk_size=chunk_size)
        return per, per.detach()
    # sampled-token estimator as a policy-gradient loss with reward -(log p_S - log p_T)
    s_lp = losses.token_logprobs_from_hidden(h, w, _next_tokens(seqs, mask.shape).to(dev), mask,
                                             chunk_size=chunk_size)
    t_lp = _response_grid(seqs, plens, [batch.teacher_token_logprobs[i] for i in idx]).to(dev)
    value = losses.reverse_kl_sampled(s_lp.detach(), t_lp, mask)
    return losses.sampled_token_pg_loss(s_lp, -value, mask), value


def local_windows(batch, idx) -> torch.Tensor:
    """(M,) indices of the batch's windows whose sequence is in `idx` (empty without windows)."""
    w = batch.windows
    if w is None or w.seq_index.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.isin(w.seq_index, torch.tensor(idx, dtype=w.seq_index.dtype)).nonzero(as_tuple=True)[0]


def pack_micro_batch(batch, idx, sel, *, pad_id: int) -> packing.Packed:
    """The sequences `idx` with the windows `sel` packed behind them (local sequence indices)."""
    seqs = [batch.sequences[i] for i in idx]
    w = batch.windows
    if sel.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return packing.pack(seqs, empty, empty, torch.zeros(0, 0, dtype=torch.long),
                            torch.zeros(0, 0, dtype=torch.bool), pad_id=pad_id)
    local = {g: b for b, g in enumerate(idx)}
    seq = torch.tensor([local[int(g)] for g in w.seq_index[sel]], dtype=torch.long)
    return packing.pack(seqs, seq, w.position[sel], w.student_ids[sel], w.student_mask[sel], pad_id=pad_id)


def _trajectory(w, hidden, packed, batch, sel, *, chunk_size: int, targets: str = "paper", reduction: str = "sum"):
    """L_traj (mean over windows) from the packed hidden states (B, Tp, H): allocates (M, K, H) rows.
    targets / reduction: topd.traj_targets / topd.traj_reduction (traj_targets.py; the paper's: paper / sum)."""
    win = batch.windows
    B, Tp, H = hidden.shape
    rows = hidden.reshape(B * Tp, H)[packed.window_rows.to(hidden.device)]  # (M, K, H): a copy of M K rows
    weights = traj_targets.soft_targets(win, sel, targets=targets).to(hidden.device)  # (M, Ks, Kt)
    s_mask = win.student_mask[sel].to(hidden.device)
    per_window = losses.trajectory_loss_from_hidden(rows, w, weights, win.teacher_ids[sel].to(hidden.device),
                                                    s_mask, reduction="none", chunk_size=chunk_size)  # (M,)
    return traj_targets.reduce_windows(per_window, traj_targets.target_positions(weights, s_mask),
                                       reduction=reduction)


def stage2_loss(model, batch, idx, *, cfg, teacher_head, pad_id: int, device, teacher=None):
    """(loss, terms) for the sequences `idx` of a pipeline batch under cfg.topd.mode.

    `teacher`: the local teacher (teacher.scoring local, topd_ds/teacher/local.py): with the full estimator its
    forward runs here, on every rank, before the student's, and the batch carries no teacher states; None: the
    states come with the batch (teacher.scoring server). One student forward over the sequences (plus, in topd
    mode, their divergent points' windows), then one LossHead call that computes the OPD per-token loss and the
    trajectory term from the final hidden states.
    Allocates: activations of B x (L + M (K - 1)) tokens, O(chunk_size x V) per loss chunk, (M, K, H) window
    rows, the (V, H) lm_head gradient; never (B, T, V) or (M, L, V)."""
    seqs = [batch.sequences[i] for i in idx]
    t_hidden = None
    if cfg.opd.estimator == "full":  # every rank has micro-batches to score, so every rank runs the teacher here
        t_hidden = (teacher_response_hidden(teacher, seqs, [batch.prompt_lens[i] for i in idx], pad_id=pad_id,
                                            device=device)
                    if teacher is not None else [batch.teacher_hidden[i] for i in idx])
    # lam = 0: no trajectory term, so no windows in the forward (the same forward as OPD, bit for bit)
    with_traj = cfg.topd.mode == "topd" and cfg.topd.lam != 0
    sel = local_windows(batch, idx) if with_traj else torch.zeros(0, dtype=torch.long)
    packed = pack_micro_batch(batch, idx, sel, pad_id=pad_id)
    hidden = student_hidden(model, packed, device, windows=sel.numel() > 0)  # (B, Tp, H)
    mask = response_mask(seqs, [batch.prompt_lens[i] for i in idx]).to(hidden.device)
    T1 = mask.shape[1]

    def student_terms(w, hidden):
        per, value = _opd_terms(w, hidden[:, :T1], batch, idx, mask, estimator=cfg.opd.estimator,
                                teacher_head=teacher_head, chunk_size=cfg.opd.chunk_size, teacher_hidden=t_hidden)
        # Without a local window the term is a zero that still depends on `per`: DeepSpeed records one
        # backward hook per output that requires grad, and its module trace must match on every rank.
        traj = (_trajectory(w, hidden, packed, batch, sel, chunk_size=cfg.opd.chunk_size,
                            targets=cfg.topd.traj_targets, reduction=cfg.topd.traj_reduction) if sel.numel()
                else 0.0 * per.sum())
        return per, value, traj

    per, value, traj = loss_head(model)(student_terms, hidden)
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
        terms["tokens/traj_windows"] = int(sel.numel())
        if sel.numel():
            terms["loss/traj"] = float(traj.detach())
        loss = losses.topd_loss(loss, traj, lam=cfg.topd.lam)
    terms["loss/total"] = float(loss.detach())
    return loss, terms


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


def stage1_loss(model, sequences, prompt_lens, teacher_hidden, *, cfg, teacher_head, pad_id: int, device):
    """Forward KL(p_T || p_S) mixed with CE on the teacher's sampled tokens by kd_ratio (paper stage 1).
    One student forward to hidden states; both models' logits made chunk by chunk inside the loss."""
    empty = torch.zeros(0, dtype=torch.long)
    packed = packing.pack(sequences, empty, empty, torch.zeros(0, 0, dtype=torch.long),
                          torch.zeros(0, 0, dtype=torch.bool), pad_id=pad_id)
    hidden = student_hidden(model, packed, device, windows=False)
    mask = response_mask(sequences, prompt_lens).to(hidden.device)
    targets = _next_tokens(sequences, mask.shape).to(hidden.device)
    # kd_ratio 0 (pure CE, e.g. the ground-truth control) needs no teacher
    t_hidden = None if teacher_hidden is None else _response_grid(sequences, prompt_lens, teacher_hidden).to(hidden.device)
    t_head = None if teacher_hidden is None else teacher_head.to(hidden.device)

    def student_terms(w, hidden):
        return losses.forward_kl_ce_from_hidden(hidden[:, :mask.shape[1]], w, t_hidden, t_head, targets, mask,
                                                kd_ratio=cfg.kd.kd_ratio, temperature=cfg.kd.temperature,
                                                chunk_size=cfg.opd.chunk_size)

    per = loss_head(model)(student_terms, hidden)
    loss = losses.reduce_loss(per, mask, reduction=cfg.opd.reduction)
    return loss, {"loss/kd": float(loss.detach())}


def stage1_loss_packed(model, sequences, prompt_lens, teacher_hidden, *, cfg, teacher_head, pad_id: int, device,
                       sp_group=None, teacher=None):
    """stage1_loss on packed rows (kd.pack_to, topd_ds/loss/kd_packing.py), and under sequence parallelism on this
    rank's shard of them.

    Without `sp_group`: the samples packed into rows of <= kd.pack_to tokens, one forward with position_ids
    restarting per sample and attention_mask=None (attention stays within each sample). With `sp_group` (the
    DeepSpeed Ulysses group, topd_ds/loss/sequence_parallel.py): all samples in one row, padded to a multiple of the
    group size, and this rank runs the forward on its 1/sp of the tokens (Ulysses' all-to-all gives attention
    the whole row, heads split) and the chunked loss on its own rows. The returned loss is this rank's share
    (the shares sum to the plain loss; reduce_packed), times what DeepSpeed's gradient averaging needs for the
    update to be the plain one (sequence_parallel.loss_scale). terms["loss/kd"] is the group's total.
    `teacher` (the local teacher, teacher_hidden None): its forward runs on the same packed rows and position ids
    as the student's, the whole rows before sharding (topd_ds/teacher/local.py, with_packed_hidden)."""
    from topd_ds.loss import kd_packing, sequence_parallel

    sp = 1 if sp_group is None else torch.distributed.get_world_size(sp_group)
    rows = kd_packing.pack_samples(sequences, prompt_lens, teacher_hidden, pack_to=cfg.kd.pack_to, pad_id=pad_id,
                                   one_row=sp > 1, multiple=sp)
    if teacher is not None:
        rows = with_packed_hidden(teacher, rows, device=device)
    if sp > 1:
        rows = rows.shard(torch.distributed.get_rank(sp_group), sp)
    rows = rows.to(device)
    out = model(input_ids=rows.ids, position_ids=rows.positions, attention_mask=None, use_cache=False,
                logits_to_keep=_NO_LOGITS.to(device), output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (R, T or T / sp, H)
    t_head = None if rows.teacher_hidden is None else teacher_head.to(hidden.device)

    def student_terms(w, hidden):
        return losses.forward_kl_ce_from_hidden(hidden, w, rows.teacher_hidden, t_head, rows.targets, rows.mask,
                                                kd_ratio=cfg.kd.kd_ratio, temperature=cfg.kd.temperature,
                                                chunk_size=cfg.opd.chunk_size)

    per = loss_head(model)(student_terms, hidden)  # (R, T'), one LossHead call on every rank
    loss = kd_packing.reduce_packed(per, rows, reduction=cfg.opd.reduction, group=sp_group if sp > 1 else None)
    total = loss.detach().clone()
    if sp > 1:
        torch.distributed.all_reduce(total, group=sp_group)
        # DeepSpeed's gradient divisor under SP depends on the ZeRO path (sequence_parallel.loss_scale)
        loss = loss * sequence_parallel.share_scale()
    return loss, {"loss/kd": float(total)}
