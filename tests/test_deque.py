"""The deque task: generator, the per-token checker against brute-force enumeration, error kinds, make-models."""

import itertools
import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topd_ds.tasks import deque
from topd_ds.tasks.deque import EOS, TAGS

SEED = random.SystemRandom().randrange(10**6)  # fresh inputs every run


def _all_valid_responses(digits: str) -> set:
    """Independent reference: every valid response, by enumerating all 2^n end sequences (small n only)."""
    return {deque.render(digits, "".join(ends)) for ends in itertools.product("LR", repeat=len(digits))}


def _reference_next(digits: str, prefix: str):
    """What may follow `prefix`, from the full enumeration; None if no valid response starts with it."""
    full = _all_valid_responses(digits)
    nxt = {r[len(prefix)] for r in full if r.startswith(prefix) and len(r) > len(prefix)}
    if prefix in full:
        nxt.add(EOS)
    return frozenset(nxt) if nxt else None


def _prompt(digits: str) -> str:
    return "".join(t + d for t, d in zip(TAGS, digits)) + "="


# ------------------------------------------------------------------------------------ generator


def test_problems_are_valid_long_and_reproducible():
    rng = random.Random(SEED)
    problems = [deque.draw_problem(rng) for _ in range(300)]
    for p in problems:
        assert deque.MIN_ITEMS <= len(p.digits) <= deque.MAX_ITEMS and set(p.digits) <= set("123456789")
        assert deque.digits_of(p.prompt) == p.digits
        assert deque.is_valid_trace(p.prompt, p.response) and deque.check_answer(p.prompt, p.response)
        assert p.as_record()["answer"] == str(sum(map(int, p.digits))) == p.response.rsplit("=", 1)[1]
        assert len(p.response) >= 60, p.response  # the length requirement, every trace
        assert len(p.response) + 1 <= deque.MAX_NEW_TOKENS
    ends = "".join(p.ends for p in problems)
    assert 0.45 < ends.count("L") / len(ends) < 0.55  # both ends in the reference traces (a bimodal teacher)
    again = random.Random(SEED)
    assert [deque.draw_problem(again) for _ in range(300)] == problems


def test_splits_are_disjoint_and_eval_unique():
    evals = deque.make_eval_set(200, seed=SEED)
    assert len({p.digits for p in evals}) == 200
    stream = deque.train_stream(seed=SEED, exclude=evals)
    train = [next(stream) for _ in range(2000)]
    assert not {p.digits for p in evals} & {p.digits for p in train}
    assert deque.make_eval_set(200, seed=SEED) == evals


@pytest.mark.parametrize("bad", ["", "=", "a4b=", "b4a5=", "a4b7c", "a0b1c2x", "a4b7=c"])
def test_bad_prompts_raise_one_clear_error(bad):
    with pytest.raises(ValueError, match="not a deque prompt"):
        deque.valid_next(bad, "")


# --------------------------------------------------------------------------------------- checker


@settings(max_examples=60, deadline=None)
@given(digits=st.text(alphabet="123456789", min_size=1, max_size=6), data=st.data())
def test_valid_next_equals_brute_force_on_valid_prefixes(digits, data):
    full = sorted(_all_valid_responses(digits))
    response = data.draw(st.sampled_from(full))
    prompt = _prompt(digits)
    for k in range(len(response) + 1):
        assert deque.valid_next(prompt, response[:k]) == _reference_next(digits, response[:k]), response[:k]
    assert deque.is_valid_trace(prompt, response) and deque.first_error(prompt, response) is None


@settings(max_examples=150, deadline=None)
@given(digits=st.text(alphabet="123456789", min_size=1, max_size=5),
       prefix=st.text(alphabet=deque.ALPHABET, max_size=14))
def test_valid_next_equals_brute_force_on_random_prefixes(digits, prefix):
    """Random strings (mostly invalid) and mutated valid ones: None exactly when nothing valid starts so."""
    assert deque.valid_next(_prompt(digits), prefix) == _reference_next(digits, prefix)


@settings(max_examples=80, deadline=None)
@given(digits=st.text(alphabet="123456789", min_size=2, max_size=6), data=st.data())
def test_first_error_is_the_first_character_off_every_valid_response(digits, data):
    response = data.draw(st.sampled_from(sorted(_all_valid_responses(digits))))
    cut = data.draw(st.integers(0, len(response) - 1))
    bad = data.draw(st.sampled_from(sorted(set(deque.ALPHABET) - {response[cut]})))
    text = response[:cut] + bad + response[cut + 1:]
    prompt, full = _prompt(digits), _all_valid_responses(digits)
    k = deque.first_error(prompt, text)
    if text in full:
        assert k is None
        return
    longest = max(j for j in range(len(text) + 1) if any(r.startswith(text[:j]) for r in full))
    assert k == longest  # the first character no valid response agrees with
    assert deque.classify_error(prompt, text) in deque.ERROR_KINDS


def test_classify_error_kinds():
    prompt = _prompt("4719385")  # a4 b7 c1 d9 e3 f8 g5, sum 37
    full = deque.render("4719385", "LRRLLRL")
    assert full == "a4=4:bg,g5=9:bf,f8=17:be,b7=24:ce,c1=25:de,e3=28:dd,d9=37"
    assert deque.classify_error(prompt, full) == "valid"
    assert deque.classify_error(prompt, "a4=4:bg,a") == "repeat"        # a tag taken again
    assert deque.classify_error(prompt, "a4=4:bg,e") == "skip"          # f and g passed over
    assert deque.classify_error(prompt, "a4=4:bg,z") == "format"
    assert deque.classify_error(prompt, "a4=4:bg,m") == "other_tag"     # no such tag in this row
    assert deque.classify_error(prompt, "a4=4:bg,g6") == "lookup"
    assert deque.classify_error(prompt, "a4=4:bg,g5=8") == "sum"
    assert deque.classify_error(prompt, "a4=4:bf") == "state"           # the right end is still g
    assert deque.classify_error(prompt, "a4=4:bg,g5=9:bf") == "early_stop"
    assert deque.classify_error(prompt, full + ",a4=41") == "overrun"
    assert deque.classify_error(prompt, full + ":") == "overrun"
    assert deque.check_answer(prompt, "a4=4:bg,a4=8,f8=37")  # the trainer's metric: final answer only
    assert not deque.is_valid_trace(prompt, "a4=4:bg,a4=8,f8=37")
    assert not deque.check_answer(prompt, "a4=4:bg,g5=9=") and not deque.check_answer(prompt, "")


def test_evaluate_greedy_scores_an_oracle():
    """A fake model that writes the reference traces scores 1.0 / 1.0; the same traces cut short score 0."""
    import torch

    from topd_ds.tasks.chartok import build_char_tokenizer

    tok = build_char_tokenizer(deque.ALPHABET)
    problems = deque.make_eval_set(5, seed=SEED)

    class Oracle(torch.nn.Module):
        def __init__(self, cut):
            super().__init__()
            self.cut = cut

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            outs = []
            for row, m in zip(input_ids, attention_mask):
                prompt = tok.decode(row[m.bool()][1:])
                p = next(p for p in problems if p.prompt == prompt)
                outs.append(tok.encode(p.response[:len(p.response) - self.cut], add_special_tokens=False)
                            + [tok.eos_token_id])
            width = max(map(len, outs))
            new = torch.tensor([o + [tok.pad_token_id] * (width - len(o)) for o in outs])
            return torch.cat([input_ids, new], dim=1)

    assert deque.evaluate_greedy(Oracle(0), tok, problems, batch_size=2) == \
        {"accuracy": 1.0, "exact_match": 1.0, "n": 5}
    assert deque.evaluate_greedy(Oracle(3), tok, problems, batch_size=2) == \
        {"accuracy": 0.0, "exact_match": 0.0, "n": 5}


# ----------------------------------------------------------------------------------- make-models


def test_make_models_quick_deque(tmp_path):
    from transformers import AutoTokenizer

    from topd_ds.errors import ConfigError
    from topd_ds.tasks.make_models import main

    out = tmp_path / "deque"
    assert main(["--task", "deque", "--out", str(out), "--quick"]) == 0
    assert sorted(os.listdir(out)) == ["data", "report.json", "student", "teacher", "tokenizer"]
    report = json.load(open(out / "report.json"))
    assert report["task"] == "deque" and report["n_eval"] == 16
    vocab = AutoTokenizer.from_pretrained(out / "teacher").get_vocab()
    assert set(deque.ALPHABET) <= set(vocab)
    evals = [json.loads(x) for x in open(out / "data" / "eval.jsonl")]
    train = [json.loads(x) for x in open(out / "data" / "train.jsonl")]
    assert all(deque.is_valid_trace(r["prompt"], r["response"]) for r in evals + train)
    assert not {r["prompt"] for r in evals} & {r["prompt"] for r in train}
    # the student taken from another model dir (a shorter teacher run): its weights, evaluated, not trained
    teacher_bytes = (out / "teacher" / "model.safetensors").read_bytes()
    assert main(["--task", "deque", "--out", str(out), "--quick", "--reuse-teacher",
                 "--student-from", str(out / "teacher")]) == 0
    assert (out / "student" / "model.safetensors").read_bytes() == teacher_bytes
    again = json.load(open(out / "report.json"))
    assert again["student"]["accuracy"] == again["teacher"]["accuracy"]
    assert again["student"]["source"] == str(tmp_path / "deque" / "teacher")
    with pytest.raises(ConfigError, match="--student-from: .* is no model dir"):
        main(["--task", "deque", "--out", str(out), "--quick", "--reuse-teacher", "--student-from", str(tmp_path)])
    with pytest.raises(ConfigError, match="--task: must be one of"):
        main(["--task", "nope", "--out", str(tmp_path / "x"), "--quick"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["opd", "topd", "stage1_kd"])
def test_deque_configs_load_against_the_committed_models(name, monkeypatch):
    from topd_ds.config import load_config

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(f"configs/deque/{name}.yaml")
    assert cfg.rollout.max_new_tokens >= deque.MAX_NEW_TOKENS  # room for the longest trace + <eos>
    assert cfg.model.student == "models/deque/student" and cfg.data.eval == "models/deque/data/eval.jsonl"


@pytest.mark.parametrize("name", ["topd", "stage1_kd"])
def test_deque_long_configs_and_split(name, monkeypatch, tmp_path):
    # The long-trace testbed: 11-digit prompts only, valid reference traces, eval rows never in train, and the
    # committed files are what scripts/deque_split.py writes.
    import json
    import subprocess
    import sys

    from topd_ds.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    cfg = load_config(f"configs/deque-long/{name}.yaml")
    assert cfg.data.prompts == "models/deque/data/long/train.jsonl" and cfg.data.eval == "models/deque/data/long/eval.jsonl"
    rows = {s: [json.loads(x) for x in open(f"models/deque/data/long/{s}.jsonl")] for s in ("train", "eval")}
    base_eval = {deque.digits_of(json.loads(x)["prompt"]) for x in open("models/deque/data/eval.jsonl")}
    for split, recs in rows.items():
        for r in recs:
            assert len(deque.digits_of(r["prompt"])) == 11 and deque.check_answer(r["prompt"], r["response"])
    train_rows = {deque.digits_of(r["prompt"]) for r in rows["train"]}
    assert not train_rows & {deque.digits_of(r["prompt"]) for r in rows["eval"]} and not train_rows & base_eval
    if name == "topd":
        subprocess.run([sys.executable, "scripts/deque_split.py", "--items", "11", "11", "--out", str(tmp_path)],
                       check=True, cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True)
        for s in ("train", "eval"):
            assert (tmp_path / f"{s}.jsonl").read_text() == open(f"models/deque/data/long/{s}.jsonl").read()
