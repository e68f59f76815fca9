"""Built-in task `deque_alt`: deque with a surface-form alternative that re-converges (issue 25).

Every non-final step of a deque trace writes the two ends left, `:lo hi` (`a4=4:be,...`). Here either order is
valid, `:be` or `:eb`: the next step reads the same state either way, so after the two letters the trace goes on
exactly as it would have (a benign alternative that re-converges within one token). deque's own choice, which end
to take next, stays (a benign alternative whose trace diverges but reaches the same answer), and so do its errors
(drift: skips, repeats; wrong sums and lookups).

    prompt    a4b7c1d9e3=
    response  a4=4:eb,e3=7:bd,b7=14:dc,d9=23:cc,c1=24     (ends written in either order)

The point of the variant is the filter study: with a teacher trained to prefer `lo hi` and a warm-start student
trained to prefer `hi lo` (`p_swap`, scripts/make_deque_alt.py), the student's preferred spelling is a frequent,
high-loss and benign token, labelled by construction:

    label(prompt, prefix, token) ->
        "benign_reconverging"   a valid token at an ends-order choice (`:` just written, two ends left)
        "benign_diverging"      a valid token at deque's end choice (two tags valid, the traces then differ)
        "forced"                a valid token where only one token is valid
        "error"                 a token that leaves every valid derivation
        None                    the prefix has already left every valid derivation (no label)

`valid_next` is deque's checker on the prefix with every written `:hi lo` put back in `lo hi` order, plus the
second order at the choice; tests compare it with brute-force enumeration of all valid responses.
Same alphabet and tokenizer as deque (no new characters), so the committed deque models can be fine-tuned onto it.
"""

import random
from dataclasses import dataclass

from topd_ds.tasks import deque
from topd_ds.tasks.deque import (ALPHABET, EOS, MAX_NEW_TOKENS, MODEL_SIZES, TAGS, check_answer,  # noqa: F401
                                 digits_of, make_eval_set as _deque_eval_set)

LABELS = ("benign_reconverging", "benign_diverging", "forced", "error")


@dataclass(frozen=True)
class Problem(deque.Problem):
    """A deque row (`digits`, `ends`) with the ends-order spelling per step (`swaps`: '0' lo hi, '1' hi lo);
    prompt, answer and expr are deque's."""

    swaps: str = ""

    @property
    def response(self) -> str:
        return render(self.digits, self.ends, self.swaps)


def render(digits: str, ends: str, swaps: str) -> str:
    """deque.render with the `:lo hi` of step k written `:hi lo` where swaps[k] == '1'."""
    steps = deque.render(digits, ends).split(",")
    if len(swaps) != len(steps) or set(swaps) - {"0", "1"}:
        raise ValueError(f"need one 0/1 per step, got {swaps!r} for {len(steps)} steps")
    out = []
    for step, s in zip(steps, swaps):
        if s == "1" and ":" in step:
            head, pair = step.rsplit(":", 1)
            step = f"{head}:{pair[::-1]}"
        out.append(step)
    return ",".join(out)


def canonical(prefix: str) -> str:
    """The prefix with every complete `:xy` pair written in tag order (`:eb` -> `:be`); a trailing `:x` is kept.
    Only the ends pair follows a ':' in deque, so nothing else changes."""
    chars = list(prefix)
    for k, ch in enumerate(chars[:-2]):
        x, y = chars[k + 1], chars[k + 2]
        if ch == ":" and x in TAGS and y in TAGS and x > y:
            chars[k + 1], chars[k + 2] = y, x
    return "".join(chars)


def _state(digits: str, prefix: str):
    """(deque state, pending): the parse of the canonical prefix; pending = the `hi` tag was written first at the
    end of the prefix (`...:e`), so the `lo` tag must come next. (None, False) off every valid derivation."""
    canon = canonical(prefix)
    if len(prefix) >= 2 and prefix[-2] == ":" and prefix[-1] in TAGS:
        st = deque._parse(digits, canon[:-1])  # phase "lo": the ends pair starts here
        if st is not None and st.phase == "lo" and st.left != st.right and prefix[-1] == TAGS[st.right]:
            return st, True
    return deque._parse(digits, canon), False


def valid_next(prompt: str, prefix: str):
    """The characters (and `EOS`) that keep `prefix` on a valid derivation of `prompt` in either ends order; None
    once it has left one."""
    digits = digits_of(prompt)
    st, pending = _state(digits, prefix)
    if st is None:
        return None
    if pending:
        return frozenset(TAGS[st.left])
    if st.phase == "lo":
        return frozenset((TAGS[st.left], TAGS[st.right]))
    return deque.valid_next(prompt, canonical(prefix))


def first_error(prompt: str, response: str):
    """Index of the first character that leaves every valid derivation (len(response) if it stops early), or None:
    deque.first_error under this task's checker (either spelling of the ends is valid)."""
    for k in range(len(response) + 1):
        allowed = valid_next(prompt, response[:k])
        if allowed is None or (response[k] if k < len(response) else EOS) not in allowed:
            return k
    return None


def is_valid_trace(prompt: str, response: str) -> bool:
    return valid_next(prompt, response.strip()) == frozenset([EOS])


def label(prompt: str, prefix: str, token: str):
    """The ground-truth label of `token` after `prefix` (module docstring), or None when the prefix is already off
    every valid derivation."""
    allowed = valid_next(prompt, prefix)
    if allowed is None:
        return None
    if token not in allowed:
        return "error"
    if len(allowed) == 1:
        return "forced"
    st, _ = _state(digits_of(prompt), prefix)
    return "benign_reconverging" if st.phase == "lo" else "benign_diverging"


# -------------------------------------------------------------------------------------- generating


def draw_problem(rng: random.Random, *, p_swap: float = 0.5, **kw) -> Problem:
    """A deque row and reference ends (deque.draw_problem), each step's ends written `hi lo` with prob p_swap."""
    p = deque.draw_problem(rng, **kw)
    return Problem(p.digits, p.ends, "".join("1" if rng.random() < p_swap else "0" for _ in p.digits))


def make_eval_set(n: int, *, seed: int = 0, p_swap: float = 0.5, **kw) -> list:
    """deque's eval rows (same digits and ends, so the splits stay disjoint from deque's), spelled with p_swap."""
    rng = random.Random(f"{seed}-eval-swaps")
    return [Problem(p.digits, p.ends, "".join("1" if rng.random() < p_swap else "0" for _ in p.digits))
            for p in _deque_eval_set(n, seed=seed, **kw)]


def train_stream(*, seed: int = 0, exclude=(), p_swap: float = 0.5, **kw):
    """An endless, reproducible generator of train problems (rows not in `exclude`), spelled with p_swap."""
    rng = random.Random(f"{seed}-train-alt")
    exclude = {p.expr if hasattr(p, "expr") else p for p in exclude}
    while True:
        p = draw_problem(rng, p_swap=p_swap, **kw)
        if p.digits not in exclude:
            yield p


def evaluate_greedy(model, tokenizer, problems, *, batch_size: int = 128, max_new_tokens: int = MAX_NEW_TOKENS,
                    return_responses: bool = False) -> dict:
    """deque.evaluate_greedy with this checker: accuracy (final answer), exact_match (valid in either order),
    and swap_rate, the share of written ends pairs in `hi lo` order (the spelling preference)."""
    from topd_ds.tasks.arith import generate_greedy

    prompts = [p.prompt if hasattr(p, "prompt") else p for p in problems]
    responses = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    n = max(len(prompts), 1)
    pairs = [r[k + 1:k + 3] for r in responses for k in range(len(r) - 2) if r[k] == ":"]
    pairs = [p for p in pairs if len(p) == 2 and p[0] in TAGS and p[1] in TAGS and p[0] != p[1]]
    result = {"accuracy": sum(check_answer(p, r) for p, r in zip(prompts, responses)) / n,
              "exact_match": sum(is_valid_trace(p, r) for p, r in zip(prompts, responses)) / n,
              "swap_rate": sum(p[0] > p[1] for p in pairs) / max(len(pairs), 1), "n": len(prompts)}
    if return_responses:
        result["responses"] = responses
    return result
