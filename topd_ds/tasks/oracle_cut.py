"""An oracle cut of the student's rollouts at their first error, for the built-in tasks with a checker (issue 25).

A diagnostic, not a method: OPD trains every response token on the reverse KL to the teacher, and on a student
that makes errors most of that loss sits after the first one (scripts/post_error_loss.py: 73% of it on deque's KD
student), on prefixes the teacher never saw. `opd.cut_after_first_error: deque` keeps each rollout up to and
including its first invalid token (the checker's `first_error`), so OPD learns the error and what led to it, and
nothing after. Only a task with a checker can do this; a real task would need a verifier per token. Measured: it
did not lift OPD on deque-long's validation split (-5.0 points [-22.9, +12.9], 3 seeds; docs/FIDELITY.md "Fifth round").

    cut = first_error_cut("deque", tokenizer)      # None for "none"
    keep = cut(token_ids, prompt_len)              # response tokens to keep (all of them for a valid trace)
"""

from topd_ds.tasks import deque, deque_alt

CHECKERS = {"deque": deque, "deque_alt": deque_alt}


def response_tokens_to_keep(prompt: str, response: str, n_tokens: int, *, task: str = "deque") -> int:
    """How many of the n_tokens response tokens (one character each, then <eos>) end at the first error: all of
    them for a valid trace; e + 1 for a first error at character e (stopping early: the <eos> is the error)."""
    e = first_error(prompt, response, task)
    return n_tokens if e is None else min(n_tokens, e + 1)


def first_error(prompt: str, response: str, task: str = "deque"):
    """The checker's first_error of `task` (deque.first_error, deque_alt.first_error)."""
    return CHECKERS[task].first_error(prompt, response)


def first_error_cut(task: str, tokenizer):
    """A callable (token_ids, prompt_len) -> response tokens to keep, or None for task "none"."""
    if task == "none":
        return None
    if task not in CHECKERS:
        raise ValueError(f"opd.cut_after_first_error: unknown checker {task!r} (none, deque, deque_alt)")

    def cut(ids, prompt_len: int) -> int:
        response = [i for i in ids[prompt_len:] if i != tokenizer.eos_token_id]
        return response_tokens_to_keep(tokenizer.decode(ids[:prompt_len], skip_special_tokens=True),
                                       tokenizer.decode(response, skip_special_tokens=True),
                                       len(ids) - prompt_len, task=task)
    return cut
