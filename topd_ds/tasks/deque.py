"""Built-in task `deque`: sum a row of tagged digits taking each from either end, with a checker for every token.

The prompt is a row of 8-11 digits (1-9), each after its tag (the letters a, b, c, ... in order), then `=`.
The response takes the digits one at a time from either end of what is left (a deque), writing the tag,
the digit, the running sum and then, while digits remain, the tags of the two ends left (the state the
next step reads); the last `=` holds the total, so the trainer's final-answer check (the text after the
last `=`) is the task's metric:

    prompt    a4b7c1d9e3=
    response  a4=4:be,e3=7:bd,b7=14:cd,d9=23:cc,c1=24     (then <eos>)

**Benign alternatives by construction.** At every step both ends are valid and lead to the same answer;
the reference traces draw the end at random (p = 0.5 each), so a teacher trained on them is bimodal at
every tag token. `valid_next(prompt, prefix)` is the ground truth: the set of characters that keep any
partial response on a valid derivation (EOS included), or None once the prefix has left it. Labelling a
sampled token is then exact: the teacher's choice, a benign alternative (valid but not the teacher's
argmax), or an error.

**Drift.** Every single step is easy (pick an end of the state, look up its digit, add it to a number below
100, step that end inward), but the state is carried from step to step: one slip (a wrong end letter)
makes every later step repeat or skip digits, so errors compound with the length of the trace (63-94
characters, 80 on average).

Splits as in `arith`: the eval set is unique rows drawn from `Random(f"{seed}-eval")`; the train stream
draws from `Random(f"{seed}-train")` and skips every eval row.

    topd-ds make-models --task deque --out models/deque
"""

import random
from dataclasses import dataclass

TAGS = "abcdefghijklmn"
ALPHABET = "0123456789" + TAGS + "=,:"
EOS = "<eos>"  # what `valid_next` calls the end of the response
MIN_ITEMS, MAX_ITEMS = 8, 11
MAX_NEW_TOKENS = 112  # 11 steps x <= 9 characters + <eos>, with room
MODEL_SIZES = {"teacher": (64, 3, 4, 3e-3), "student": (32, 2, 4, 3e-3)}  # (hidden, layers, heads, peak lr)
_MAX_DRAWS = 1000


@dataclass(frozen=True)
class Problem:
    """One row: `digits` (string), `ends` (the reference's choice per step, 'L'/'R'), answer = digit sum."""

    digits: str
    ends: str

    @property
    def expr(self) -> str:  # the key the splits deduplicate on (name shared with arith)
        return self.digits

    @property
    def prompt(self) -> str:
        return "".join(t + d for t, d in zip(TAGS, self.digits)) + "="

    @property
    def answer(self) -> int:
        return sum(map(int, self.digits))

    @property
    def response(self) -> str:
        return render(self.digits, self.ends)

    def as_record(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "answer": str(self.answer)}


def digits_of(prompt: str) -> str:
    """'4719' for 'a4b7c1d9=' (the '=' optional); ValueError if not a deque prompt."""
    text = prompt.strip()
    text = text[:-1] if text.endswith("=") else text
    digits = text[1::2]
    if not digits or len(digits) > len(TAGS) or text != "".join(t + d for t, d in zip(TAGS, digits)) \
            or not digits.isdigit():
        raise ValueError(f"not a deque prompt (a<digit>b<digit>... then '='): {prompt!r}")
    return digits


def render(digits: str, ends: str) -> str:
    """The response that takes digits from `ends` ('L'/'R' per step): 'a4=4:bg,g5=9:bf,...'."""
    if len(ends) != len(digits) or set(ends) - {"L", "R"}:
        raise ValueError(f"need one L/R per digit, got {ends!r} for {digits!r}")
    left, right, total, steps = 0, len(digits) - 1, 0, []
    for end in ends:
        if end == "L":
            i, left = left, left + 1
        else:
            i, right = right, right - 1
        total += int(digits[i])
        steps.append(f"{TAGS[i]}{digits[i]}={total}" + (f":{TAGS[left]}{TAGS[right]}" if left <= right else ""))
    return ",".join(steps)


# --------------------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class _State:
    left: int      # index of the leftmost digit not taken
    right: int     # index of the rightmost digit not taken
    total: int     # running sum of the digits taken
    phase: str     # what comes next: "tag", "digit", "eq", "num", "lo", "hi" or "comma"
    item: int      # index of the current step's digit (phases "digit" .. "num")
    typed: str     # the characters of the running sum typed so far (phase "num")


def _parse(digits: str, prefix: str):
    """The state after `prefix`, or None at the first character that leaves a valid derivation."""
    st = _State(0, len(digits) - 1, 0, "tag", -1, "")
    for ch in prefix:
        if st.phase == "tag":
            if st.left > st.right or ch not in (TAGS[st.left], TAGS[st.right]):
                return None
            i = TAGS.index(ch)
            left, right = (st.left + 1, st.right) if i == st.left else (st.left, st.right - 1)
            st = _State(left, right, st.total, "digit", i, "")
        elif st.phase == "digit":
            if ch != digits[st.item]:
                return None
            st = _State(st.left, st.right, st.total + int(ch), "eq", st.item, "")
        elif st.phase == "eq":
            if ch != "=":
                return None
            st = _State(st.left, st.right, st.total, "num", st.item, "")
        elif st.phase in ("lo", "hi", "comma"):  # the state ':' lo hi, then ','
            want = TAGS[st.left] if st.phase == "lo" else TAGS[st.right] if st.phase == "hi" else ","
            if ch != want:
                return None
            nxt = {"lo": "hi", "hi": "comma", "comma": "tag"}[st.phase]
            st = _State(st.left, st.right, st.total, nxt, st.item, "")
        else:  # "num": the running sum, then ':' (digits left) or the end
            target = str(st.total)
            if st.typed == target:
                if ch != ":" or st.left > st.right:
                    return None
                st = _State(st.left, st.right, st.total, "lo", st.item, "")
            elif ch == target[len(st.typed)]:
                st = _State(st.left, st.right, st.total, "num", st.item, st.typed + ch)
            else:
                return None
    return st


def valid_next(prompt: str, prefix: str):
    """The characters (and `EOS`) that keep `prefix` on a valid derivation of `prompt`; None if it already left.

    A valid response is `step(,step)*` with step = tag digit '=' running-sum ':' lo hi, where the tag is the
    leftmost or the rightmost one not yet taken, the digit is that tag's, the sum is the exact running total
    and lo, hi are the tags of the two ends left after it; the last step (no digit left) has no ':' lo hi and
    the response ends right after its sum. Pure string work, O(len(prefix)).
    """
    digits = digits_of(prompt)
    st = _parse(digits, prefix)
    if st is None:
        return None
    if st.phase == "tag":
        return frozenset((TAGS[st.left], TAGS[st.right]))
    if st.phase == "digit":
        return frozenset(digits[st.item])
    if st.phase == "eq":
        return frozenset("=")
    if st.phase in ("lo", "hi", "comma"):
        return frozenset(TAGS[st.left] if st.phase == "lo" else TAGS[st.right] if st.phase == "hi" else ",")
    target = str(st.total)
    if st.typed != target:
        return frozenset(target[len(st.typed)])
    return frozenset(":") if st.left <= st.right else frozenset([EOS])


def is_valid_trace(prompt: str, response: str) -> bool:
    """True if `response` is a complete valid derivation (every step legal, every sum right, all digits taken)."""
    return valid_next(prompt, response.strip()) == frozenset([EOS])


def check_answer(prompt: str, response: str) -> bool:
    """True if the text after the last '=' is the digit sum (the trainer's metric). Malformed text is wrong."""
    final = response.strip().rsplit("=", 1)[-1].strip()
    return final.isdigit() and int(final) == sum(map(int, digits_of(prompt)))


def first_error(prompt: str, response: str):
    """Index of the first character that leaves a valid derivation (len(response) if it stops early), or None."""
    digits = digits_of(prompt)
    for k in range(len(response)):
        if _parse(digits, response[:k + 1]) is None:
            return k
    return None if valid_next(prompt, response) == frozenset([EOS]) else len(response)


ERROR_KINDS = ("repeat", "skip", "other_tag", "lookup", "sum", "state", "early_stop", "overrun", "format")


def classify_error(prompt: str, response: str) -> str:
    """'valid', or the kind of the first error (one of ERROR_KINDS).

    'repeat': a tag already taken; 'skip': a tag not at either end (drift: the model lost track of the
    ends); 'other_tag' a character that is no tag of this row; 'lookup': the wrong digit for the tag; 'sum':
    a wrong running sum; 'state': a wrong end letter in the ':' lo hi state; 'early_stop'; 'overrun' (goes
    on after the last digit); 'format' (anything else).
    """
    k = first_error(prompt, response)
    if k is None:
        return "valid"
    if k == len(response):
        return "early_stop"
    digits, ch = digits_of(prompt), response[k]
    st = _parse(digits, response[:k])
    if st.phase == "tag" and st.left > st.right:
        return "overrun"
    if st.phase == "tag" and ch in TAGS[:len(digits)]:
        return "repeat" if not st.left <= TAGS.index(ch) <= st.right else "skip"
    if st.phase == "tag" and ch in TAGS:
        return "other_tag"
    if st.phase == "digit" and ch.isdigit():
        return "lookup"
    if st.phase == "num" and ch.isdigit():
        return "sum"
    if st.phase == "num" and st.typed == str(st.total) and st.left > st.right:
        return "overrun"
    if st.phase in ("lo", "hi") and ch in TAGS:
        return "state"
    return "format"


# -------------------------------------------------------------------------------------- generating


def draw_problem(rng: random.Random, *, min_items: int = MIN_ITEMS, max_items: int = MAX_ITEMS,
                 p_left: float = 0.5) -> Problem:
    """A row of min_items..max_items digits 1-9 and a reference end per step (L with probability p_left)."""
    if not 1 <= min_items <= max_items <= len(TAGS):
        raise ValueError(f"need 1 <= min_items <= max_items <= {len(TAGS)}, got {min_items}, {max_items}")
    n = rng.randint(min_items, max_items)
    digits = "".join(str(rng.randint(1, 9)) for _ in range(n))
    ends = "".join("L" if rng.random() < p_left else "R" for _ in range(n))
    return Problem(digits=digits, ends=ends)


def make_eval_set(n: int, *, seed: int = 0, **kw) -> list:
    """`n` problems with unique digit rows, reproducible from `seed` (independent of the train stream)."""
    rng = random.Random(f"{seed}-eval")
    seen, out = set(), []
    for _ in range(_MAX_DRAWS * max(n, 1)):
        if len(out) == n:
            return out
        p = draw_problem(rng, **kw)
        if p.digits not in seen:
            seen.add(p.digits)
            out.append(p)
    raise ValueError(f"could not draw {n} unique eval rows")


def train_stream(*, seed: int = 0, exclude=(), **kw):
    """An endless, reproducible generator of train problems whose rows are not in `exclude`."""
    rng = random.Random(f"{seed}-train")
    exclude = {p.expr if isinstance(p, Problem) else p for p in exclude}
    while True:
        p = draw_problem(rng, **kw)
        if p.digits not in exclude:
            yield p


# --------------------------------------------------------------------------------------- evaluating


def evaluate_greedy(model, tokenizer, problems, *, batch_size: int = 128, max_new_tokens: int = MAX_NEW_TOKENS,
                    return_responses: bool = False) -> dict:
    """Greedy-decode every problem; {"accuracy": final answer right, "exact_match": whole trace valid, "n"}.

    `exact_match` here means "a valid derivation" (any order of ends), the task's analogue of arith's.
    """
    from topd_ds.tasks.arith import generate_greedy

    prompts = [p.prompt if isinstance(p, Problem) else p for p in problems]
    responses = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    n = max(len(prompts), 1)
    result = {"accuracy": sum(check_answer(p, r) for p, r in zip(prompts, responses)) / n,
              "exact_match": sum(is_valid_trace(p, r) for p, r in zip(prompts, responses)) / n,
              "n": len(prompts)}
    if return_responses:
        result["responses"] = responses
    return result
