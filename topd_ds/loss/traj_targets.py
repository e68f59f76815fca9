"""The trajectory term's soft targets checked and varied (issue 25): pure functions over window tensors.

The paper's L_traj (losses.trajectory_soft_targets / trajectory_loss) maps every student window position j to a
soft target y_j = sum_i P_ij onehot(x^T_i) / sum_i P_ij from the OT plan P, which ignores order, and applies it in
the student's own window context c_j = x_<t + s_<j. Once the two windows have diverged, the teacher's tokens can be
invalid in the student's context. This module measures that against a task's checker and offers two options
beside the paper's form (the paper's stays the default, `topd.traj_targets: paper`, `topd.traj_reduction: sum`):

    first_divergence(...)       d_m: the first window position where the two windows differ
    until_divergence(w, d)      targets only at student positions j <= d_m (contexts equal up to there)
    reduce_windows(per, valid)  per-window sum (paper) or mean over the window's target positions, then the
                                mean over windows: with "mean", lambda does not scale with K
    invalid_target_mass(...)    the share of target mass on tokens the checker calls invalid in c_j
    deque_invalid(...)          that checker's (Ks, Kt) table for one window on the deque task

Shapes: M windows, Ks student positions, Kt teacher positions; weights (M, Ks, Kt) as from trajectory_soft_targets.
"""

import torch

TARGETS = ("paper", "until_divergence")
REDUCTIONS = ("sum", "mean")


def first_divergence(teacher_ids: torch.Tensor, teacher_mask: torch.Tensor, student_ids: torch.Tensor,
                     student_mask: torch.Tensor) -> torch.Tensor:
    """(M,) int64: the first position j where the windows differ (different ids, or one window ended), or
    min(Kt, Ks) when they agree throughout. Position d_m is the fork itself: up to and including it, the student's
    context x_<t + s_<j equals the teacher's. teacher (M, Kt), student (M, Ks); masks bool."""
    K = min(teacher_ids.shape[1], student_ids.shape[1])
    tm, sm = teacher_mask[:, :K].bool(), student_mask[:, :K].bool()
    agree = tm & sm & (teacher_ids[:, :K] == student_ids[:, :K])                     # (M, K)
    both_ended = ~tm & ~sm                                                           # equal (empty) tails
    same = agree | both_ended
    differ = ~same
    first = torch.where(differ.any(-1), differ.float().argmax(-1), torch.full_like(differ[:, 0], K, dtype=torch.long))
    return first.long()


def until_divergence(weights: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """weights (M, Ks, Kt) with the rows of student positions j > d_m zeroed (no target after the fork);
    rows j <= d_m unchanged. divergence (M,) from first_divergence."""
    Ks = weights.shape[1]
    keep = torch.arange(Ks, device=weights.device)[None, :] <= divergence.to(weights.device)[:, None]  # (M, Ks)
    return torch.where(keep[:, :, None], weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


def target_positions(weights: torch.Tensor, student_mask: torch.Tensor) -> torch.Tensor:
    """(M, Ks) bool: student positions that carry a target (unmasked, nonzero row): where L_traj has a KL term."""
    return student_mask.bool() & (weights.sum(-1) > 0)


def reduce_windows(per_window: torch.Tensor, valid: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """L_traj over windows from per-window sums of KLs (M,) (losses.trajectory_loss(..., reduction="none")).

    sum (paper): mean over windows with a target of sum_j KL_j, which grows with K.
    mean: mean over those windows of (sum_j KL_j) / n_m, n_m = the window's target positions: a per-token KL,
    on the scale of L_OPD whatever K is. valid (M, Ks) from target_positions. No window with a target -> 0
    (clamp_min(1) on the counts: an empty batch contributes nothing rather than nan)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"topd.traj_reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    n = valid.sum(-1)                                                               # (M,)
    has = n > 0
    per = per_window if reduction == "sum" else per_window / n.clamp_min(1).to(per_window.dtype)
    return torch.where(has.to(per.device), per, 0.0).sum() / has.sum().clamp_min(1).to(per.device)


def invalid_target_mass(weights: torch.Tensor, invalid: torch.Tensor, labelled: torch.Tensor) -> dict:
    """How much target mass the checker calls invalid. weights (M, Ks, Kt); invalid (M, Ks, Kt) bool: teacher
    token i is not a valid next token in the student's context c_j; labelled (M, Ks) bool: c_j is still on a valid
    derivation (the checker can judge it). Returns {"invalid_mass": share of the labelled positions' target mass
    on invalid tokens, "mostly_invalid": share of labelled target positions with more than half of theirs invalid,
    "positions": labelled target positions}; nan shares when there is none."""
    w = weights.double()
    row = w.sum(-1)                                                                  # (M, Ks)
    use = labelled.bool() & (row > 0)
    bad = (w * invalid.double()).sum(-1)                                             # (M, Ks)
    n = int(use.sum())
    if n == 0:
        return {"invalid_mass": float("nan"), "mostly_invalid": float("nan"), "positions": 0}
    return {"invalid_mass": float(bad[use].sum() / row[use].sum()),
            "mostly_invalid": float((bad[use] > 0.5 * row[use]).double().mean()), "positions": n}


def deque_invalid(prompt: str, prefix: str, student_chars: list, teacher_chars: list, *, task: str = "deque"):
    """((Ks, Kt) bool invalid, (Ks,) bool labelled) for one window on the deque task: at student position j the
    context is prefix + student_chars[:j]; teacher token i is invalid there when it is not in
    deque.valid_next(prompt, context); labelled is False once the context has left every valid derivation
    (valid_next is None). Characters as deque spells them (deque.EOS for the end token). task: "deque" or
    "deque_alt" (either spelling of the ends valid)."""
    import importlib

    from topd_ds.tasks import deque

    valid_next = importlib.import_module(f"topd_ds.tasks.{task}").valid_next

    Ks, Kt = len(student_chars), len(teacher_chars)
    invalid = torch.zeros(Ks, Kt, dtype=torch.bool)
    labelled = torch.zeros(Ks, dtype=torch.bool)
    context = prefix
    for j in range(Ks):
        allowed = valid_next(prompt, context)
        if allowed is None:
            break  # every later context extends this one: off the derivation too
        labelled[j] = True
        invalid[j] = torch.tensor([c not in allowed for c in teacher_chars], dtype=torch.bool)
        if student_chars[j] == deque.EOS:
            break
        context += student_chars[j]
    return invalid, labelled


def soft_targets(windows, sel=None, *, targets: str = "paper") -> torch.Tensor:
    """The weights (M, Ks, Kt) the trainer uses for `windows` (a batch.Windows; rows `sel`): the paper's
    plan-derived targets, cut after the first divergence under targets="until_divergence"."""
    from topd_ds.loss.losses import trajectory_soft_targets

    if targets not in TARGETS:
        raise ValueError(f"topd.traj_targets: expected one of {TARGETS}, got {targets!r}")
    pick = (lambda x: x) if sel is None else (lambda x: x[sel])  # noqa: E731
    w = trajectory_soft_targets(pick(windows.plan), pick(windows.teacher_ids), pick(windows.teacher_mask),
                                pick(windows.student_mask))
    if targets == "until_divergence":
        w = until_divergence(w, first_divergence(pick(windows.teacher_ids), pick(windows.teacher_mask),
                                                 pick(windows.student_ids), pick(windows.student_mask)))
    return w


def check_batch_targets(batch, tokenizer, *, checker: str, targets: str = "paper") -> dict:
    """Rank 0, for the logs: traj/invalid_target_mass and traj/mostly_invalid_positions of a TOPD batch's windows
    under `checker` ("deque" or "deque_alt"); {} without windows or checker. Decodes every window: O(M K^2)
    checker calls."""
    windows = getattr(batch, "windows", None)
    if checker == "none" or windows is None or windows.seq_index.numel() == 0 or windows.plan.numel() == 0:
        return {}
    if checker not in ("deque", "deque_alt"):
        raise ValueError(f"topd.traj_checker: unknown checker {checker!r}")
    from topd_ds.tasks import deque

    def chars(ids, mask):
        return [deque.EOS if i == tokenizer.eos_token_id else tokenizer.convert_ids_to_tokens(int(i))
                for i, m in zip(ids.tolist(), mask.tolist()) if m]

    w = soft_targets(windows, targets=targets)
    M, Ks, Kt = w.shape
    invalid = torch.zeros(M, Ks, Kt, dtype=torch.bool)
    labelled = torch.zeros(M, Ks, dtype=torch.bool)
    for m, (b, t) in enumerate(zip(windows.seq_index.tolist(), windows.position.tolist())):
        seq, p = batch.sequences[b], batch.prompt_lens[b]
        prompt = tokenizer.decode(seq[:p], skip_special_tokens=True)
        prefix = tokenizer.decode(seq[p:t], skip_special_tokens=True)
        s_chars = chars(windows.student_ids[m], windows.student_mask[m])
        t_chars = chars(windows.teacher_ids[m], windows.teacher_mask[m])
        inv, lab = deque_invalid(prompt, prefix, s_chars, t_chars, task=checker)
        invalid[m, :len(s_chars), :len(t_chars)] = inv
        labelled[m, :len(s_chars)] = lab
    r = invalid_target_mass(w, invalid, labelled)
    return {"traj/invalid_target_mass": r["invalid_mass"], "traj/mostly_invalid_positions": r["mostly_invalid"],
            "traj/labelled_positions": float(r["positions"])}
