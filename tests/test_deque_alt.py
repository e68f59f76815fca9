"""The deque_alt task (issue 25): its checker and labels against brute-force enumeration of every valid response
(all end choices x all ends-order spellings), on random rows, prefixes and mutations."""

import itertools
import random

import pytest

from topd_ds.tasks import deque, deque_alt as alt

SEED = 2513
print(f"test_deque_alt: seed {SEED}")


def all_valid(digits):
    """Every valid response, by enumeration: 2^n end sequences x 2^n spellings (small n only)."""
    out = set()
    for ends in itertools.product("LR", repeat=len(digits)):
        for swaps in itertools.product("01", repeat=len(digits)):
            out.add(alt.render(digits, "".join(ends), "".join(swaps)) + deque.EOS)
    return out


def allowed_brute(responses, context):
    nxt = set()
    for r in responses:
        if r.startswith(context) and len(r) > len(context):
            rest = r[len(context):]
            nxt.add(deque.EOS if rest == deque.EOS else rest[0])
    return nxt or None


def label_brute(responses, context, token):
    """The label from the enumeration alone: is the token valid; how many tokens are; do the continuations after
    the two valid tokens ever meet again at the same text position (re-converging) or not."""
    allowed = allowed_brute(responses, context)
    if allowed is None:
        return None
    if token not in allowed:
        return "error"
    if len(allowed) == 1:
        return "forced"
    a, b = sorted(allowed)
    tails = lambda t: {r[len(context) + 1:] for r in responses if r.startswith(context + t)}  # noqa: E731
    # re-converging: after one more character each, the two branches can go on with the same texts
    ta = {s[1:] for s in tails(a)}
    tb = {s[1:] for s in tails(b)}
    return "benign_reconverging" if ta == tb else "benign_diverging"


def _rows(rng, n):
    return ["".join(rng.choice("123456789") for _ in range(rng.randint(2, 5))) for _ in range(n)]


def test_valid_next_and_labels_equal_brute_force_on_valid_prefixes():
    rng = random.Random(SEED)
    for digits in _rows(rng, 12):
        prompt = "".join(t + d for t, d in zip(deque.TAGS, digits)) + "="
        responses = all_valid(digits)
        for r in rng.sample(sorted(responses), min(6, len(responses))):
            for k in range(len(r) - len(deque.EOS) + 1):
                ctx = r[:k]
                want = allowed_brute(responses, ctx)
                assert alt.valid_next(prompt, ctx) == frozenset(want), (prompt, ctx)
                for tok in list(want) + [rng.choice(deque.ALPHABET)]:
                    assert alt.label(prompt, ctx, tok) == label_brute(responses, ctx, tok), (prompt, ctx, tok)


def test_valid_next_equals_brute_force_on_mutated_prefixes():
    rng = random.Random(SEED + 1)
    for digits in _rows(rng, 12):
        prompt = "".join(t + d for t, d in zip(deque.TAGS, digits)) + "="
        responses = all_valid(digits)
        r = rng.choice(sorted(responses))[:-len(deque.EOS)]
        for _ in range(10):
            k = rng.randrange(len(r))
            mutated = r[:k] + rng.choice(deque.ALPHABET) + r[k + 1:]
            for j in range(len(mutated) + 1):
                want = allowed_brute(responses, mutated[:j])
                got = alt.valid_next(prompt, mutated[:j])
                assert got == (None if want is None else frozenset(want)), (prompt, mutated[:j])
                assert alt.label(prompt, mutated[:j], "a") == label_brute(responses, mutated[:j], "a")


def test_swapped_traces_are_valid_deque_traces_after_canonical_and_the_answer_is_unchanged():
    rng = random.Random(SEED + 2)
    for _ in range(50):
        p = alt.draw_problem(rng, p_swap=0.5)
        assert alt.is_valid_trace(p.prompt, p.response)
        assert deque.is_valid_trace(p.prompt, alt.canonical(p.response))
        assert deque.check_answer(p.prompt, p.response) and str(p.answer) == p.as_record()["answer"]
    # a spelling preference is what the data carry: p_swap 0.9 writes most pairs hi lo
    rng = random.Random(SEED + 3)
    pairs = [s.rsplit(":", 1)[1] for p in (alt.draw_problem(rng, p_swap=0.9) for _ in range(200))
             for s in p.response.split(",") if ":" in s]
    share = sum(a > b for a, b in pairs if a != b) / sum(a != b for a, b in pairs)
    assert 0.85 < share < 0.95


def test_labels_on_a_hand_written_trace():
    prompt = "a1b2c3="
    assert alt.label(prompt, "", "a") == "benign_diverging"           # either end
    assert alt.label(prompt, "a1=1:", "c") == "benign_reconverging"   # `:cb` spells the same state as `:bc`
    assert alt.label(prompt, "a1=1:c", "b") == "forced"               # the pair's other tag
    assert alt.label(prompt, "a1=1:c", "c") == "error"
    assert alt.label(prompt, "a1=1:cb,", "b") == "benign_diverging"
    assert alt.label(prompt, "a1=2", ":") is None                     # the prefix already left (wrong sum)
    assert alt.label(prompt, "a1=1:cb,c3=4:bb,b2=6", deque.EOS) == "forced"
    with pytest.raises(ValueError, match="0/1 per step"):
        alt.render("123", "LLL", "01")


def test_eval_rows_are_deques_and_train_excludes_them():
    evals = alt.make_eval_set(30, seed=0, p_swap=0.2)
    assert [p.digits for p in evals] == [p.digits for p in deque.make_eval_set(30, seed=0)]
    stream = alt.train_stream(seed=0, exclude=evals, p_swap=0.8)
    assert not {next(stream).digits for _ in range(300)} & {p.digits for p in evals}


def test_make_deque_alt_quick_builds_models_data_and_report(tmp_path):
    """scripts/make_deque_alt.py --quick: fine-tunes the committed deque models for a few steps into OUT."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "alt"
    subprocess.run([sys.executable, "scripts/make_deque_alt.py", "--quick", "--out", str(out)], cwd=repo, check=True,
                   capture_output=True, timeout=300)
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["p_swap"] == 0.1 and report["student"]["p_swap"] == 0.9
    for role in ("teacher", "student"):
        assert (out / role / "config.json").exists() and 0 <= report[role]["swap_rate"] <= 1
    rows = {name: [json.loads(x) for x in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "val", "eval")}
    prompts = {name: {r["prompt"] for r in rs} for name, rs in rows.items()}
    assert not prompts["train"] & prompts["eval"] and not prompts["val"] & prompts["eval"]
    assert not prompts["train"] & prompts["val"]
    assert all(alt.is_valid_trace(r["prompt"], r["response"]) for rs in rows.values() for r in rs)
