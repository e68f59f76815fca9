"""Built-in task `arith`: arithmetic expressions with step-by-step solutions, checker, JSONL export.

A problem is an expression over non-negative integers with +, -, * and parentheses. The prompt is the
expression followed by `=`; the response reduces it one operation per step, steps joined by `=`, in the
spirit of the paper's example:

    prompt    5+(2*3)=
    response  5+6=11            (the model then emits <eos>)

Reduction order (what `solve` does, and what the models learn): the leftmost innermost parenthesised
group first (its parentheses drop when it becomes one number); inside a group, or at the top level once
no parentheses remain, the leftmost `*` first, then the leftmost `+`/`-`. Every intermediate value is kept
in 0..max_value (the generator re-draws otherwise), so no negative number ever appears.

Splits: the eval set is a fixed list of unique expressions drawn from `Random(f"{seed}-eval")`; the train
stream draws from `Random(f"{seed}-train")` and skips every expression string in the eval set.

    topd-ds make-data --out data/arith --n-train 20000 --n-eval 1000 --seed 0 --depth 3 --max-operand 10
"""

import argparse
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass

_TOKEN_RE = re.compile(r"\d+|[-+*()]")
_MAX_DRAWS = 1000  # re-draws of one expression before giving up (the ranges are then impossible)


@dataclass(frozen=True)
class Problem:
    """One arith problem: `prompt` = expr + "=", `response` = steps joined by "=", `answer` = final value."""

    expr: str
    steps: tuple
    answer: int

    @property
    def prompt(self) -> str:
        return self.expr + "="

    @property
    def response(self) -> str:
        return "=".join(self.steps)

    def as_record(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "answer": str(self.answer)}


# ----------------------------------------------------------------------------------------- solving


def tokenize(expr: str) -> list:
    """['5', '+', '(', '2', '*', '3', ')'] for '5+(2*3)'; raises ValueError on any other character."""
    expr = expr.strip()
    if expr.endswith("="):
        expr = expr[:-1]
    toks = _TOKEN_RE.findall(expr)
    if "".join(toks) != expr or not toks:
        raise ValueError(f"not an arith expression: {expr!r}")
    return toks


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def _reduce_flat(toks: list) -> list:
    """One operation on a parenthesis-free token list [n, op, n, ...]: leftmost `*`, else leftmost +/-."""
    ops = toks[1::2]
    i = 2 * ops.index("*") + 1 if "*" in ops else 1
    value = _apply(int(toks[i - 1]), toks[i], int(toks[i + 1]))
    return toks[:i - 1] + [str(value)] + toks[i + 2:]


def step_once(toks: list) -> list:
    """Apply exactly one reduction (one operation) to a token list; see the module docstring for the order."""
    if "(" not in toks:
        return _reduce_flat(toks)
    # leftmost innermost group: the first ')' closes it, its '(' is the last one before that ')'
    close = toks.index(")")
    open_ = max(i for i in range(close) if toks[i] == "(")
    inner = toks[open_ + 1:close]
    if len(inner) == 1:  # "(n)" alone: only from user input (we never generate it); drop the parens
        return toks[:open_] + inner + toks[close + 1:]
    inner = _reduce_flat(inner)
    if len(inner) == 1:
        return toks[:open_] + inner + toks[close + 1:]
    return toks[:open_ + 1] + inner + toks[close:]


def solve(expr: str) -> list:
    """The solution steps of `expr` (with or without trailing '='): ["5+6", "11"] for "5+(2*3)".

    Each step applies one operation; the last step is the value. Raises ValueError if not an expression.
    """
    toks = tokenize(expr)
    steps = []
    while len(toks) > 1:
        toks = step_once(toks)
        steps.append("".join(toks))
    if not steps:  # a bare number: its "solution" is itself
        steps.append(toks[0])
    return steps


def _values_in_range(expr: str, max_value: int) -> bool:
    """True if every number in every step of `expr` lies in 0..max_value (no negatives, no overflow)."""
    for step in solve(expr):
        for tok in _TOKEN_RE.findall(step):
            if tok.isdigit() and int(tok) > max_value:
                return False
        if step.startswith("-") or "--" in step or "+-" in step or "*-" in step or "(-" in step:
            return False
    return True


def check_answer(expr_or_prompt: str, response_text: str) -> bool:
    """True if the text after the last '=' of the response is the value of the expression.

    Malformed responses (no digits, trailing junk, empty) are wrong, never an exception.
    """
    true_value = int(solve(expr_or_prompt)[-1])
    final = response_text.strip().rsplit("=", 1)[-1].strip()
    return bool(re.fullmatch(r"-?\d+", final)) and int(final) == true_value


def exact_match(expr_or_prompt: str, response_text: str) -> bool:
    """True if the response is exactly the reference trace (every step, in the reference order)."""
    return response_text.strip() == "=".join(solve(expr_or_prompt))


# -------------------------------------------------------------------------------------- generating


def _draw_expr(rng: random.Random, depth: int, max_operand: int) -> str:
    """An expression of nesting depth `depth`: 2-3 terms, one of them a parenthesised depth-1 smaller one."""
    n_terms = rng.randint(2, 3)
    terms = [str(rng.randint(0, max_operand)) for _ in range(n_terms)]
    if depth > 1:
        terms[rng.randrange(n_terms)] = "(" + _draw_expr(rng, depth - 1, max_operand) + ")"
    ops = [rng.choice("+-*") for _ in range(n_terms - 1)]
    out = terms[0]
    for op, term in zip(ops, terms[1:]):
        out += op + term
    return out


def draw_problem(rng: random.Random, *, depth: int = 3, max_operand: int = 10, max_value: int = 100) -> Problem:
    """One problem of depth uniform in 1..depth whose intermediate values all lie in 0..max_value."""
    if depth < 1 or max_operand < 1 or max_value < max_operand:
        raise ValueError(f"need depth >= 1, max_operand >= 1, max_value >= max_operand; got "
                         f"{depth}, {max_operand}, {max_value}")
    for _ in range(_MAX_DRAWS):
        expr = _draw_expr(rng, rng.randint(1, depth), max_operand)
        if _values_in_range(expr, max_value):
            steps = tuple(solve(expr))
            return Problem(expr=expr, steps=steps, answer=int(steps[-1]))
    raise ValueError(f"no expression within 0..{max_value} after {_MAX_DRAWS} draws")


def make_eval_set(n: int, *, seed: int = 0, depth: int = 3, max_operand: int = 10,
                  max_value: int = 100) -> list:
    """`n` unique problems, reproducible from `seed` (independent of the train stream)."""
    rng = random.Random(f"{seed}-eval")
    seen, out = set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = draw_problem(rng, depth=depth, max_operand=max_operand, max_value=max_value)
        if p.expr not in seen:
            seen.add(p.expr)
            out.append(p)
    raise ValueError(f"could not draw {n} unique eval problems (space too small for depth={depth}, "
                     f"max_operand={max_operand})")


def train_stream(*, seed: int = 0, exclude=(), depth: int = 3, max_operand: int = 10, max_value: int = 100):
    """An endless, reproducible generator of train problems whose expressions are not in `exclude`."""
    rng = random.Random(f"{seed}-train")
    exclude = {p.expr if isinstance(p, Problem) else p for p in exclude}
    while True:
        p = draw_problem(rng, depth=depth, max_operand=max_operand, max_value=max_value)
        if p.expr not in exclude:
            yield p


def make_splits(n_train: int, n_eval: int, *, seed: int = 0, depth: int = 3, max_operand: int = 10,
                max_value: int = 100) -> tuple:
    """(train, eval) problem lists; no train expression is an eval expression."""
    kw = dict(depth=depth, max_operand=max_operand, max_value=max_value)
    evals = make_eval_set(n_eval, seed=seed, **kw)
    stream = train_stream(seed=seed, exclude=evals, **kw)
    return [next(stream) for _ in range(n_train)], evals


def write_jsonl(path: str, problems) -> str:
    """Write problems (or record dicts) as JSONL {"prompt", "response", "answer"}: temp file, then rename."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p.as_record() if hasattr(p, "as_record") else p) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------- evaluating


def generate_greedy(model, tokenizer, prompts, *, batch_size: int = 128, max_new_tokens: int = 80) -> list:
    """Greedy responses (text, specials dropped) to prompt strings, batched with left padding."""
    import torch

    from topd_ds.data import pad_batch
    from topd_ds.tasks.chartok import encode_prompt

    responses = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = [encode_prompt(tokenizer, text) for text in prompts[i:i + batch_size]]
            ids, mask = pad_batch(chunk, tokenizer.pad_token_id, side="left")  # (B, T), (B, T)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
            new = out[:, ids.shape[1]:]  # (B, <= max_new_tokens)
            responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return responses


def evaluate_greedy(model, tokenizer, problems, *, batch_size: int = 128, max_new_tokens: int = 80,
                    return_responses: bool = False) -> dict:
    """Greedy-decode every problem (batched, left padding) and score it.

    Returns {"accuracy": final-answer accuracy, "exact_match": whole-trace accuracy, "n": count}
    (+ "responses" when asked). `problems` are Problem objects or prompt strings ("5+(2*3)=").
    """
    prompts = [p.prompt if isinstance(p, Problem) else p for p in problems]
    responses = generate_greedy(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    acc = sum(check_answer(p, r) for p, r in zip(prompts, responses))
    em = sum(exact_match(p, r) for p, r in zip(prompts, responses))
    n = max(len(prompts), 1)
    result = {"accuracy": acc / n, "exact_match": em / n, "n": len(prompts)}
    if return_responses:
        result["responses"] = responses
    return result


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="topd-ds make-data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=3, help="max nesting depth (each problem: 1..depth)")
    parser.add_argument("--max-operand", type=int, default=10, help="operands drawn from 0..max-operand")
    parser.add_argument("--max-value", type=int, default=100, help="every intermediate value in 0..max-value")
    args = parser.parse_args(argv)
    from topd_ds.errors import ConfigError

    for key in ("n_train", "n_eval"):
        if getattr(args, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')}: must be >= 0, got {getattr(args, key)}")
    try:
        train, evals = make_splits(args.n_train, args.n_eval, seed=args.seed, depth=args.depth,
                                   max_operand=args.max_operand, max_value=args.max_value)
    except ValueError as err:
        raise ConfigError(f"make-data: {err}") from err
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evals)
    print(f"wrote {len(train)} train and {len(evals)} eval problems to {args.out}")
    return 0
