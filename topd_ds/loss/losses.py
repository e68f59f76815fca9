"""Per-token distillation losses for stage 1 (KD), stage 2 (OPD) and TOPD's trajectory term.

Conventions (shared with the trainer):
* Token tensors are (B, T) aligned with the LOGITS positions: logits[:, t] predicts token t+1 of the
  sequence; `mask` (B, T) marks the response positions that count (a float mask is read as mask != 0).
* Per-token losses come back as (B, T) with exact zeros where masked; `reduce_loss` reduces them.
* Full-vocabulary losses are evaluated in row chunks (topd_ds/loss/chunked.py) so that memory does not
  grow with T x V; `chunk_size=None` runs the same math under plain autograd.
* Compute is fp32 for fp16/bf16 inputs, float64 stays float64.

Paper: arXiv 2606.00305, Sec 3 (L_traj, L_TOPD), Sec 4.1 / App. B (kd_ratio 0.5 stage 1, reverse KL
stage 2). Formulas, shapes and caveats are collected in docs/LOSSES.md.
"""

from __future__ import annotations

import functools
import math

import torch

from topd_ds.loss.chunked import chunked_rows
from topd_ds.errors import ConfigError

REDUCTIONS = ("token", "sequence", "batch")
WINDOW_REDUCTIONS = ("mean", "sum", "none")


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax math; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bool_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> torch.Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_same(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} != {ref_name} {tuple(ref.shape)}")


def _kl_from_logprobs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim, with 0 log 0 = 0.

    The difference is zeroed BEFORE the product so that entries with p_v = 0 (e.g. -inf logits on
    both sides, giving -inf - -inf = nan) contribute neither a nan value nor a nan gradient.
    """
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, 0.0)
    return (p * diff).sum(-1)


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, *, reduction: str = "token",
                normalizer: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the unmasked positions.

    token:    sum_{b,t} m l / max(1, sum m)           -- every response token weighs the same.
    sequence: mean_b [ sum_t m l / max(1, sum_t m) ]  over sequences with >= 1 token
              -- every sequence weighs the same, whatever its length.
    batch:    sum_{b,t} m l / normalizer, normalizer = B * T unless given (Dr.GRPO-style constant:
              pass e.g. n_sequences * max_len so the scale does not depend on the lengths drawn).
    The clamp_min(1) denominators only matter when nothing is counted: the numerator is then exactly
    0, so the loss is 0 (not 0/0 = nan) and an empty micro-batch contributes no gradient.
    """
    m = _bool_mask(mask, per_token.shape)
    x = torch.where(m, per_token, 0.0)  # (B, T); masked infs/nans never leak in
    if reduction == "token":
        return x.sum() / m.sum().clamp_min(1)
    if reduction == "sequence":
        per_seq = x.sum(1) / m.sum(1).clamp_min(1)  # (B,)
        return per_seq.sum() / m.any(1).sum().clamp_min(1)
    if reduction == "batch":
        denom = float(normalizer) if normalizer is not None else float(per_token.numel())
        if denom <= 0:
            raise ConfigError(f"normalizer: must be > 0, got {denom}")
        return x.sum() / denom
    raise ConfigError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------- stage 1: KD

def _fkl_ce_rows(*args: torch.Tensor, kd_ratio: float, temperature: float, teacher: str) -> torch.Tensor:
    """Row function of forward_kl_ce. args = (s (n,V), [t (n,V) | ids (n,k), lt (n,k)], targets (n,))."""
    s = _up(args[0])
    targets = args[-1]
    loss = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    if kd_ratio > 0:
        ls_tau = torch.log_softmax(s / temperature, -1)  # (n, V)
        if teacher == "full":
            lt_tau = torch.log_softmax(_up(args[1]) / temperature, -1)  # (n, V)
            kl = _kl_from_logprobs(lt_tau, ls_tau)
        else:  # teacher top-k: the teacher renormalised over its k ids, the student over the full vocab
            ids, lt = args[1], _up(args[2])
            lt_k = torch.log_softmax(lt / temperature, -1)  # (n, k)
            kl = _kl_from_logprobs(lt_k, ls_tau.gather(-1, ids))
        loss = loss + kd_ratio * temperature ** 2 * kl
    if kd_ratio < 1:
        ce = -torch.log_softmax(s, -1).gather(-1, targets[:, None]).squeeze(-1)  # (n,)
        loss = loss + (1 - kd_ratio) * ce
    return loss


def forward_kl_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                  mask: torch.Tensor, *, kd_ratio: float = 0.5, temperature: float = 1.0,
                  teacher_topk_ids: torch.Tensor | None = None, teacher_topk_logprobs: torch.Tensor | None = None,
                  chunk_size: int | None = 1024) -> torch.Tensor:
    """Stage-1 per-token loss: kd_ratio * tau^2 * KL(p_T^tau || p_S^tau) + (1 - kd_ratio) * CE(targets).

    p^tau = softmax(logits / tau). The tau^2 factor (Hinton et al., 2015) keeps the soft-target
    gradient on the same scale as tau changes; at tau = 1 (the default) it is 1. CE is at tau = 1.
    Teacher as full logits (B, T, V), or as top-k (teacher_topk_ids (B, T, k) int64,
    teacher_topk_logprobs (B, T, k)): then KL runs over the teacher's k ids only, with the teacher
    renormalised over them and the student's full-vocabulary log-probs gathered at them.
    Teacher -inf logits (masked vocabulary) contribute 0 (0 log 0 = 0).
    student_logits (B, T, V), targets (B, T) int64 (read only where mask), mask (B, T) -> (B, T).
    Paper App. B: kd_ratio = 0.5 in stage 1.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ConfigError(f"kd_ratio: must be in [0, 1], got {kd_ratio}")
    if temperature <= 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    has_topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if teacher_logits is not None and has_topk:
        raise ValueError("teacher_logits: give either full teacher logits or teacher top-k, not both")
    if has_topk and (teacher_topk_ids is None or teacher_topk_logprobs is None):
        raise ValueError("teacher_topk_ids: top-k ids and top-k logprobs must come together")
    if kd_ratio > 0 and teacher_logits is None and not has_topk:
        raise ValueError("teacher_logits: required when kd_ratio > 0")
    m = _bool_mask(mask, student_logits.shape[:2])
    if kd_ratio == 0:
        teacher, teacher_rows = "none", []
    elif teacher_logits is not None:
        teacher, teacher_rows = "full", [teacher_logits]
    else:
        teacher, teacher_rows = "topk", [teacher_topk_ids, teacher_topk_logprobs]
    fn = functools.partial(_fkl_ce_rows, kd_ratio=kd_ratio, temperature=temperature, teacher=teacher)
    return chunked_rows(fn, [student_logits, *teacher_rows, targets], [], m, chunk_size=chunk_size)


def _fkl_ce_hidden_rows(*args: torch.Tensor, kd_ratio: float, temperature: float, teacher: str) -> torch.Tensor:
    """args = (h_s (n,Hs), [h_t (n,Ht)], targets (n,), W_s (V,Hs), [W_t (V,Ht)])."""
    if teacher == "full":
        h_s, h_t, targets, w_s, w_t = args
        return _fkl_ce_rows(h_s @ w_s.T, h_t.to(w_t.dtype) @ w_t.T, targets, kd_ratio=kd_ratio, temperature=temperature,
                            teacher="full")
    h_s, targets, w_s = args
    return _fkl_ce_rows(h_s @ w_s.T, targets, kd_ratio=kd_ratio, temperature=temperature, teacher="none")


def forward_kl_ce_from_hidden(student_hidden: torch.Tensor, student_head_w: torch.Tensor,
                              teacher_hidden: torch.Tensor | None, teacher_head_w: torch.Tensor | None,
                              targets: torch.Tensor, mask: torch.Tensor, *, kd_ratio: float = 0.5,
                              temperature: float = 1.0, chunk_size: int | None = 1024) -> torch.Tensor:
    """forward_kl_ce with both models' logits made per chunk from final hidden states and lm_head weights.

    student_hidden (B, T, Hs), student_head_w (V, Hs), teacher_hidden (B, T, Ht) and teacher_head_w (V, Ht)
    (both None when kd_ratio = 0), targets (B, T) int64, mask (B, T) -> (B, T). Allocates O(chunk_size x V)
    per chunk and the (V, Hs) weight gradient; never a (B, T, V) tensor.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ConfigError(f"kd_ratio: must be in [0, 1], got {kd_ratio}")
    if temperature <= 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    m = _bool_mask(mask, student_hidden.shape[:2])
    if kd_ratio > 0:
        if teacher_hidden is None or teacher_head_w is None:
            raise ValueError("teacher_hidden: required (with teacher_head_w) when kd_ratio > 0")
        fn = functools.partial(_fkl_ce_hidden_rows, kd_ratio=kd_ratio, temperature=temperature, teacher="full")
        return chunked_rows(fn, [student_hidden, teacher_hidden, targets], [student_head_w, teacher_head_w], m,
                            chunk_size=chunk_size)
    fn = functools.partial(_fkl_ce_hidden_rows, kd_ratio=kd_ratio, temperature=temperature, teacher="none")
    return chunked_rows(fn, [student_hidden, targets], [student_head_w], m, chunk_size=chunk_size)


# --------------------------------------------------------------------------- stage 2: reverse KL

def _rkl_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(n, V), (n, V) logits -> (n,) KL(p_S || p_T)."""
    return _kl_from_logprobs(torch.log_softmax(_up(s), -1), torch.log_softmax(_up(t), -1))


def _rkl_hidden_rows(s: torch.Tensor, t_hidden: torch.Tensor, t_w: torch.Tensor) -> torch.Tensor:
    return _rkl_rows(s, t_hidden.to(t_w.dtype) @ t_w.T)  # (n, H) @ (H, V) -> (n, V); bf16 hidden, fp32 head


def _rkl_both_rows(s_hidden, t_hidden, s_w, t_w) -> torch.Tensor:
    return _rkl_rows(s_hidden @ s_w.T, t_hidden.to(t_w.dtype) @ t_w.T)


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                    chunk_size: int | None = 1024) -> torch.Tensor:
    """Per-token KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)) over the full vocabulary.

    student_logits, teacher_logits (B, T, V); mask (B, T) -> (B, T). Exact (no estimator noise).
    Where the teacher has a -inf logit and the student positive mass the KL is +inf (true value);
    where both are -inf the entry contributes 0. Gradient w.r.t. student logits:
    p_S * (log p_S - log p_T - KL). chunk_size rows per chunk; None = unchunked reference path.
    """
    _check_same(teacher_logits, student_logits, "teacher_logits", "student_logits")
    m = _bool_mask(mask, student_logits.shape[:2])
    return chunked_rows(_rkl_rows, [student_logits, teacher_logits], [], m, chunk_size=chunk_size)


def reverse_kl_from_hidden(student_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_lm_head_weight: torch.Tensor, mask: torch.Tensor, *,
                           chunk_size: int | None = 1024) -> torch.Tensor:
    """reverse_kl_full with teacher logits = teacher_hidden @ W_T^T computed per chunk.

    student_logits (B, T, V), teacher_hidden (B, T, H), teacher_lm_head_weight (V, H) -> (B, T).
    The teacher's (B, T, V) logits never exist whole.
    """
    if teacher_lm_head_weight.shape[0] != student_logits.shape[-1]:
        raise ValueError(f"teacher_lm_head_weight: vocab {teacher_lm_head_weight.shape[0]} "
                         f"!= student_logits vocab {student_logits.shape[-1]}")
    m = _bool_mask(mask, student_logits.shape[:2])
    return chunked_rows(_rkl_hidden_rows, [student_logits, teacher_hidden], [teacher_lm_head_weight], m,
                        chunk_size=chunk_size)


def reverse_kl_hidden_both(student_hidden: torch.Tensor, student_head_w: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_head_w: torch.Tensor, mask: torch.Tensor, *,
                           chunk_size: int | None = 1024) -> torch.Tensor:
    """reverse_kl_full with both models' logits computed per chunk from hidden states and lm_head.

    student_hidden (B, T, Hs), student_head_w (V, Hs), teacher_hidden (B, T, Ht), teacher_head_w (V, Ht)
    -> (B, T). Neither (B, T, V) tensor is ever materialised: for a 152k vocab at 16k tokens this is the
    form to use. Gradients flow to student_hidden and student_head_w (and the teacher's if they ask).
    """
    if student_head_w.shape[0] != teacher_head_w.shape[0]:
        raise ValueError(f"teacher_head_w: vocab {teacher_head_w.shape[0]} != student {student_head_w.shape[0]}")
    m = _bool_mask(mask, student_hidden.shape[:2])
    return chunked_rows(_rkl_both_rows, [student_hidden, teacher_hidden], [student_head_w, teacher_head_w], m,
                        chunk_size=chunk_size)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _rkl_topk_rows(s: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor, *, tail_bucket: bool,
                   tail_floor: float) -> torch.Tensor:
    ls = torch.log_softmax(_up(s), -1).gather(-1, ids)  # (n, k) student log-probs at the teacher's ids
    lt = _up(lt).to(ls.dtype)  # (n, k)
    ls = torch.where(torch.isneginf(lt), -math.inf, ls)  # padding slots (teacher -inf) are absent for both
    if not tail_bucket:
        return _kl_from_logprobs(ls - torch.logsumexp(ls, -1, keepdim=True), lt - torch.logsumexp(lt, -1, keepdim=True))
    # Tail = mass outside the k ids. The top-k log-mass is capped at log(1 - tail_floor) BEFORE
    # log1mexp so that neither the value nor the gradient ever sees log(0).
    cap = math.log1p(-tail_floor)
    ls_tail = _log1mexp(torch.logsumexp(ls, -1, keepdim=True).clamp_max(cap))  # (n, 1)
    lt_tail = _log1mexp(torch.logsumexp(lt, -1, keepdim=True).clamp_max(cap))  # (n, 1)
    return _kl_from_logprobs(torch.cat([ls, ls_tail], -1), torch.cat([lt, lt_tail], -1))


def reverse_kl_topk(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                    teacher_topk_logprobs: torch.Tensor, mask: torch.Tensor, *, tail_bucket: bool = True,
                    tail_floor: float = 1e-6, chunk_size: int | None = 1024) -> torch.Tensor:
    """Per-token reverse KL restricted to the teacher's top-k ids (a biased estimate; see below).

    student_logits (B, T, V); teacher_topk_ids (B, T, k) int64, distinct per row; teacher_topk_logprobs
    (B, T, k): the teacher's full-vocabulary log-probs at those ids -> (B, T). A slot whose teacher
    logprob is -inf is padding: it is dropped for both models (any id, duplicates included, may fill it).
    tail_bucket=False: both distributions renormalised over the k ids, KL over k categories.
    tail_bucket=True: k + 1 categories, the last one holding each model's remaining mass
    1 - sum_k p(v); each tail is floored at tail_floor so that log 0 never appears.
    Instability: student mass outside the teacher's top-k is invisible without the tail (the student
    can move mass off the teacher's set at no cost) and only seen in aggregate with it; the value is a
    lower bound of the full reverse KL with the tail (data processing), no bound without; the set
    changes discontinuously when the teacher's k-th and (k+1)-th logprobs tie or swap.
    """
    _check_same(teacher_topk_logprobs, teacher_topk_ids, "teacher_topk_logprobs", "teacher_topk_ids")
    if not 0 < tail_floor < 1:
        raise ConfigError(f"tail_floor: must be in (0, 1), got {tail_floor}")
    m = _bool_mask(mask, student_logits.shape[:2])
    fn = functools.partial(_rkl_topk_rows, tail_bucket=tail_bucket, tail_floor=tail_floor)
    return chunked_rows(fn, [student_logits, teacher_topk_ids, teacher_topk_logprobs], [], m, chunk_size=chunk_size)


def _rkl_topk_hidden_rows(h: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor, w: torch.Tensor, *,
                          tail_bucket: bool, tail_floor: float) -> torch.Tensor:
    return _rkl_topk_rows(h @ w.T, ids, lt, tail_bucket=tail_bucket, tail_floor=tail_floor)


def reverse_kl_topk_from_hidden(student_hidden: torch.Tensor, student_head_w: torch.Tensor,
                                teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                                mask: torch.Tensor, *, tail_bucket: bool = True, tail_floor: float = 1e-6,
                                chunk_size: int | None = 1024) -> torch.Tensor:
    """reverse_kl_topk with the student's logits = student_hidden (B, T, H) @ student_head_w (V, H)^T per chunk.
    Allocates O(chunk_size x V) per chunk, never (B, T, V)."""
    _check_same(teacher_topk_logprobs, teacher_topk_ids, "teacher_topk_logprobs", "teacher_topk_ids")
    if not 0 < tail_floor < 1:
        raise ConfigError(f"tail_floor: must be in (0, 1), got {tail_floor}")
    m = _bool_mask(mask, student_hidden.shape[:2])
    fn = functools.partial(_rkl_topk_hidden_rows, tail_bucket=tail_bucket, tail_floor=tail_floor)
    return chunked_rows(fn, [student_hidden, teacher_topk_ids, teacher_topk_logprobs], [student_head_w], m,
                        chunk_size=chunk_size)


def _token_logprob_hidden_rows(h: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_up(h @ w.T), -1).gather(-1, targets[:, None])[:, 0]


def token_logprobs_from_hidden(student_hidden: torch.Tensor, student_head_w: torch.Tensor, targets: torch.Tensor,
                               mask: torch.Tensor, *, chunk_size: int | None = 1024) -> torch.Tensor:
    """log p_S(targets) per token from hidden states (B, T, H), lm_head (V, H), targets (B, T) -> (B, T), 0 where
    masked. The sampled-token estimator's student log-probs; O(chunk_size x V) per chunk."""
    m = _bool_mask(mask, student_hidden.shape[:2])
    return chunked_rows(_token_logprob_hidden_rows, [student_hidden, targets], [student_head_w], m,
                        chunk_size=chunk_size)


def reverse_kl_sampled(student_token_logprobs: torch.Tensor, teacher_token_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Per-token log p_S(x_t) - log p_T(x_t) at the sampled token x_t ~ p_S: (B, T), (B, T) -> (B, T).

    Its expectation under x_t ~ p_S is KL(p_S || p_T) (the "k1" estimator); single values can be
    negative. Differentiating it directly is NOT the reverse-KL gradient (the sampling distribution
    depends on the student too): train with `sampled_token_pg_loss` on its negation.
    """
    _check_same(teacher_token_logprobs, student_token_logprobs, "teacher_token_logprobs", "student_token_logprobs")
    m = _bool_mask(mask, student_token_logprobs.shape)
    return torch.where(m, student_token_logprobs - teacher_token_logprobs, 0.0)


def sampled_token_pg_loss(student_token_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Policy-gradient surrogate: per-token -A_t * log p_S(x_t), A detached. (B, T) x3 -> (B, T).

    With A_t = -(log p_S(x_t) - log p_T(x_t)).detach() (OPD's per-token reward, Lu & Thinking Machines
    2025), grad = E_{x~p_S}[(log p_S - log p_T) grad log p_S] = grad KL(p_S || p_T) per token, since the
    score has zero mean (E[grad log p_S] = 0). This per-token form ignores the effect of x_t on later
    tokens' rewards (no discounting / return), as in the OPD recipe.
    """
    _check_same(advantages, student_token_logprobs, "advantages", "student_token_logprobs")
    m = _bool_mask(mask, student_token_logprobs.shape)
    return torch.where(m, -advantages.detach() * student_token_logprobs, 0.0)


# --------------------------------------------------------------------------- TOPD trajectory term

def trajectory_soft_targets(plan: torch.Tensor, teacher_ids: torch.Tensor, teacher_mask: torch.Tensor,
                            student_mask: torch.Tensor) -> torch.Tensor:
    """Soft-target weights over teacher window positions for each student window position.

    plan (M, Kt, Ks): rows = TEACHER positions i, cols = STUDENT positions j (C_ij = c(x^T_{t+i}, x^S_{t+j})).
    y_j = sum_i plan[i, j] onehot(x^T_{t+i}) / sum_i plan[i, j], summing over unmasked teacher positions
    (paper Sec 3's y~_{t+i} with the plan's orientation made explicit). Returns weights (M, Ks, Kt) with
    rows summing to 1, and zero rows where the student position is masked or its column carries no mass
    on unmasked teacher positions. teacher_ids (M, Kt) int64 is only checked here (unmasked ids >= 0);
    trajectory_loss merges duplicate ids. teacher_mask (M, Kt), student_mask (M, Ks).
    """
    M, Kt, Ks = plan.shape
    if tuple(teacher_ids.shape) != (M, Kt):
        raise ValueError(f"teacher_ids: expected shape {(M, Kt)}, got {tuple(teacher_ids.shape)}")
    tm = _bool_mask(teacher_mask, (M, Kt), "teacher_mask")
    sm = _bool_mask(student_mask, (M, Ks), "student_mask")
    if bool((teacher_ids[tm] < 0).any()):
        raise ValueError("teacher_ids: negative id at an unmasked teacher position")
    w = plan.transpose(1, 2).clamp_min(0)  # (M, Ks, Kt)
    w = torch.where(tm[:, None, :] & sm[:, :, None], w, 0.0)
    total = w.sum(-1, keepdim=True)  # (M, Ks, 1)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), 0.0)


def _merged_neg_entropy(weights: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """sum_v y_v log y_v where y_v = sum_{i: id_i = v} w_i, without a (.., V) one-hot: (M,Ks,Kt),(M,Kt) -> (M,Ks)."""
    sorted_ids, perm = teacher_ids.sort(dim=-1, stable=True)  # (M, Kt)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    seg = (new.cumsum(-1) - 1)[:, None, :].expand_as(weights)  # (M, Ks, Kt): merged slot of each sorted id
    w_sorted = weights.gather(-1, perm[:, None, :].expand_as(weights))
    merged = torch.zeros_like(weights).scatter_add_(-1, seg, w_sorted)  # (M, Ks, Kt), unused slots 0
    return torch.special.xlogy(merged, merged).sum(-1)


def _soft_ce_rows(s: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """-(w * log p_S[ids]).sum: (n, V), (n, Kt), (n, Kt) -> (n,)."""
    ls = torch.log_softmax(_up(s), -1).gather(-1, ids)  # (n, Kt)
    return -(w.to(ls.dtype) * ls).sum(-1)


def _soft_ce_hidden_rows(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, head_w: torch.Tensor) -> torch.Tensor:
    return _soft_ce_rows(h @ head_w.T, ids, w)


def _trajectory(row_fn, first_rows: torch.Tensor, weights: torch.Tensor, teacher_ids: torch.Tensor,
                student_mask: torch.Tensor, shared: list, reduction: str, chunk_size: int | None) -> torch.Tensor:
    M, Ks, Kt = weights.shape
    if reduction not in WINDOW_REDUCTIONS:
        raise ConfigError(f"reduction: expected one of {WINDOW_REDUCTIONS}, got {reduction!r}")
    if tuple(teacher_ids.shape) != (M, Kt):
        raise ValueError(f"teacher_ids: expected shape {(M, Kt)}, got {tuple(teacher_ids.shape)}")
    w = weights.detach()  # targets are constants (the plan comes from a no-grad OT solve)
    valid = _bool_mask(student_mask, (M, Ks), "student_mask") & (w.sum(-1) > 0)  # (M, Ks)
    ids = teacher_ids.clamp_min(0)  # masked teacher slots carry weight 0, any valid id will do
    ids_rows = ids[:, None, :].expand(M, Ks, Kt)  # (M, Ks, Kt) view, gathered per chunk
    cross = chunked_rows(row_fn, [first_rows, ids_rows, w], shared, valid, chunk_size=chunk_size)  # (M, Ks)
    neg_ent = _merged_neg_entropy(w, ids).to(cross.dtype)  # (M, Ks), constant
    per_window = torch.where(valid, cross + neg_ent, 0.0).sum(-1)  # (M,): sum over window positions
    if reduction == "none":
        return per_window
    if reduction == "sum":
        return per_window.sum()
    # mean over windows that have at least one valid position; clamp_min(1): no window -> 0, not nan
    return per_window.sum() / valid.any(-1).sum().clamp_min(1)


def trajectory_loss(student_logits: torch.Tensor, weights: torch.Tensor, teacher_ids: torch.Tensor,
                    student_mask: torch.Tensor, *, reduction: str = "mean",
                    chunk_size: int | None = 1024) -> torch.Tensor:
    """L_traj = sum_j KL(y_j || p_S(. | c_j)) per window (paper Sec 3), then reduced over windows.

    student_logits (M, Ks, V): the student's logits at its window positions (position j predicts the
    j-th student window token); weights (M, Ks, Kt) from trajectory_soft_targets; teacher_ids (M, Kt)
    int64; student_mask (M, Ks). KL(y || p) = sum_v y_v log y_v - sum_i w_ji log p(x^T_i): the
    cross-entropy part gathers log p_S at the teacher ids (no (M, Ks, V) one-hot), the entropy part
    merges duplicate teacher ids by a sort + scatter_add (y is a distribution over distinct ids).
    reduction over windows: "mean" (windows with >= 1 valid position), "sum", "none" -> (M,).
    Weights are treated as constants (detached).
    """
    return _trajectory(_soft_ce_rows, student_logits, weights, teacher_ids, student_mask, [], reduction, chunk_size)


def trajectory_loss_from_hidden(student_hidden: torch.Tensor, student_head_w: torch.Tensor, weights: torch.Tensor,
                                teacher_ids: torch.Tensor, student_mask: torch.Tensor, *, reduction: str = "mean",
                                chunk_size: int | None = 1024) -> torch.Tensor:
    """trajectory_loss with logits = student_hidden (M, Ks, H) @ student_head_w (V, H)^T per chunk."""
    return _trajectory(_soft_ce_hidden_rows, student_hidden, weights, teacher_ids, student_mask, [student_head_w],
                       reduction, chunk_size)


def topd_loss(opd_loss: torch.Tensor, traj_loss: torch.Tensor, *, lam: float = 1.0) -> torch.Tensor:
    """L_TOPD = L_OPD + lambda * L_traj (paper Sec 3). The paper does not report lambda; 1.0 is our default."""
    return opd_loss + lam * traj_loss
