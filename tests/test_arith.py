"""The arith task: generator, solver, checker, tokenizer, greedy evaluation, model round trip, make-models."""

import json
import os
import random
import re

import pytest
import torch

from topd_ds.tasks import arith
from topd_ds.tasks.chartok import ARITH_ALPHABET, SPECIAL_TOKENS, encode_prompt

from conftest import SESSION_SEED as SEED  # noqa: E402  fresh every session, printed in pytest's header


def _py_eval(expr: str) -> int:
    """Independent reference: Python's own parser and precedence on the same string."""
    assert re.fullmatch(r"[0-9+\-*()]+", expr), expr
    return eval(expr)  # noqa: S307 - only digits, + - * and parentheses (checked above)


# ------------------------------------------------------------------------------------ generator


def test_generator_is_deterministic_per_seed():
    a = arith.make_splits(50, 30, seed=SEED)
    b = arith.make_splits(50, 30, seed=SEED)
    c = arith.make_splits(50, 30, seed=SEED + 1)
    assert a == b
    assert [p.expr for p in a[0]] != [p.expr for p in c[0]]
    assert [p.expr for p in a[1]] != [p.expr for p in c[1]]


def test_splits_are_disjoint_and_eval_unique():
    train, evals = arith.make_splits(3000, 300, seed=SEED)
    eval_exprs = {p.expr for p in evals}
    assert len(eval_exprs) == len(evals) == 300
    assert not eval_exprs & {p.expr for p in train}
    # the eval set does not depend on how much train data is drawn
    assert arith.make_splits(10, 300, seed=SEED)[1] == evals


@pytest.mark.parametrize("depth,max_operand,max_value", [(1, 5, 30), (3, 10, 100), (4, 12, 150)])
def test_every_step_keeps_the_value_and_range(depth, max_operand, max_value):
    rng = random.Random(SEED)
    seen_depth = 0
    for _ in range(300):
        p = arith.draw_problem(rng, depth=depth, max_operand=max_operand, max_value=max_value)
        value = _py_eval(p.expr)
        assert p.answer == value
        for step in p.steps:
            assert _py_eval(step) == value, (p.expr, step)
            assert all(0 <= int(n) <= max_value for n in re.findall(r"\d+", step)), (p.expr, step)
            assert "-" not in step or not re.search(r"(^|[-+*(])-", step), (p.expr, step)  # no negatives
        for n in re.findall(r"\d+", p.expr):
            assert 0 <= int(n) <= max_operand
        # one operation per step: the operator count drops by exactly one each time
        n_ops = [len(re.findall(r"[-+*]", s)) for s in (p.expr,) + p.steps]
        assert all(a - b == 1 for a, b in zip(n_ops, n_ops[1:])), (p.expr, p.steps)
        assert p.steps[-1] == str(value)
        seen_depth = max(seen_depth, _paren_depth(p.expr))
    assert seen_depth == depth - 1  # depth d nests d-1 levels of parentheses


def _paren_depth(expr: str) -> int:
    d = best = 0
    for ch in expr:
        d += (ch == "(") - (ch == ")")
        best = max(best, d)
    return best


def test_solve_order_matches_the_paper_example():
    assert arith.solve("5+(2*3)") == ["5+6", "11"]
    assert arith.solve("5+(2*3)=") == ["5+6", "11"]
    assert arith.solve("2+3*4") == ["2+12", "14"]  # * before +
    assert arith.solve("9-2-3") == ["7-3", "4"]  # left to right
    assert arith.solve("(1+2)*(3+4)") == ["3*(3+4)", "3*7", "21"]  # leftmost group first
    assert arith.solve("((1+2)*3)+1") == ["(3*3)+1", "9+1", "10"]  # innermost first
    p = arith.Problem(expr="5+(2*3)", steps=("5+6", "11"), answer=11)
    assert p.as_record() == {"prompt": "5+(2*3)=", "response": "5+6=11", "answer": "11"}
    with pytest.raises(ValueError):
        arith.solve("5+a")


def test_answer_checker_and_exact_match():
    assert arith.check_answer("5+(2*3)=", "5+6=11")
    assert arith.check_answer("5+(2*3)", "11")  # final answer only, no trace
    assert arith.check_answer("5+(2*3)=", "5+7=11 ")  # wrong step, right answer
    assert not arith.exact_match("5+(2*3)=", "5+7=11")
    assert arith.exact_match("5+(2*3)=", "5+6=11")
    assert not arith.check_answer("5+(2*3)=", "5+6=12")
    for malformed in ["", "=", "5+6=", "5+6=11x", "5+6=1 1", "abc", "5+6=+11", "5+6=11=="]:
        assert not arith.check_answer("5+(2*3)=", malformed), malformed
        assert not arith.exact_match("5+(2*3)=", malformed), malformed


def test_write_jsonl_is_atomic_and_readable(tmp_path):
    train, _ = arith.make_splits(20, 5, seed=SEED)
    path = arith.write_jsonl(str(tmp_path / "d" / "train.jsonl"), train)
    records = [json.loads(line) for line in open(path)]
    assert records == [p.as_record() for p in train]
    assert os.listdir(tmp_path / "d") == ["train.jsonl"]  # no temp file left


def test_make_data_cli(tmp_path):
    out = tmp_path / "data"
    assert arith.main(["--out", str(out), "--n-train", "40", "--n-eval", "10", "--seed", "3",
                       "--depth", "2", "--max-operand", "6"]) == 0
    train = [json.loads(x) for x in open(out / "train.jsonl")]
    evals = [json.loads(x) for x in open(out / "eval.jsonl")]
    assert len(train) == 40 and len(evals) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for r in train + evals:
        assert str(_py_eval(r["prompt"][:-1])) == r["answer"] == r["response"].rsplit("=", 1)[-1]
        assert _paren_depth(r["prompt"]) <= 1


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip(char_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer
    assert tok.convert_ids_to_tokens(list(range(4))) == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(SPECIAL_TOKENS) + len(ARITH_ALPHABET)
    for i, ch in enumerate(ARITH_ALPHABET):
        assert tok.encode(ch, add_special_tokens=False) == [4 + i]
        assert tok.decode([4 + i]) == ch
    rng = random.Random(SEED)
    text = "".join(rng.choice(ARITH_ALPHABET) for _ in range(200))
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 200 and tok.decode(ids) == text
    prompt = encode_prompt(tok, "5+(2*3)=")
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[1:]) == "5+(2*3)="
    assert tok.decode(prompt + [tok.eos_token_id], skip_special_tokens=True) == "5+(2*3)="
    assert tok.encode("x", add_special_tokens=False) == [tok.unk_token_id]
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.encode(text, add_special_tokens=False) == ids
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


# ------------------------------------------------------------------------------- models and eval


def _tiny(char_tokenizer, arch="llama", seed=0, hidden=32, layers=2):
    from topd_ds.tasks.models import build_model

    return build_model(arch, seed=seed, vocab_size=len(char_tokenizer), hidden=hidden, layers=layers,
                       heads=4, max_positions=160)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_save_load_round_trip(char_tokenizer, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from topd_ds.tasks.models import save_model

    model = _tiny(char_tokenizer, arch=arch, seed=SEED % 1000)
    path = save_model(model, str(tmp_path / "m"), char_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, len(char_tokenizer), (3, 17), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dir left


def test_batched_greedy_equals_one_at_a_time(char_tokenizer):
    """Left-padded batches must decode exactly like unpadded single prompts."""
    model = _tiny(char_tokenizer, seed=SEED % 1000, hidden=32, layers=1)
    problems = arith.make_eval_set(12, seed=SEED)  # prompts of different lengths -> real padding
    assert len({len(p.prompt) for p in problems}) > 1
    batched = arith.evaluate_greedy(model, char_tokenizer, problems, batch_size=12, max_new_tokens=12,
                                    return_responses=True)
    single = [arith.evaluate_greedy(model, char_tokenizer, [p], batch_size=1, max_new_tokens=12,
                                    return_responses=True)["responses"][0] for p in problems]
    assert batched["responses"] == single
    assert batched["n"] == 12


def test_evaluate_greedy_scores_a_perfect_model(char_tokenizer):
    """A stand-in model that always emits the reference trace scores 1.0 on both metrics."""
    problems = arith.make_eval_set(5, seed=SEED)

    class Oracle(torch.nn.Module):
        training = False

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            outs = []
            for row, m in zip(input_ids, attention_mask):
                prompt = char_tokenizer.decode(row[m.bool()][1:])
                ids = char_tokenizer.encode(arith.Problem(prompt[:-1], tuple(arith.solve(prompt)), 0).response,
                                            add_special_tokens=False) + [char_tokenizer.eos_token_id]
                outs.append(row.tolist() + ids)
            width = max(map(len, outs))
            return torch.tensor([o + [char_tokenizer.pad_token_id] * (width - len(o)) for o in outs])

    res = arith.evaluate_greedy(Oracle(), char_tokenizer, problems, batch_size=2)
    assert res == {"accuracy": 1.0, "exact_match": 1.0, "n": 5}


def test_lr_schedule():
    from topd_ds.tasks.make_models import lr_at

    assert lr_at(0.0, 0, peak=1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(0.0, 9, peak=1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(0.5, 50, peak=1.0, warmup=10, min_frac=0.1) == pytest.approx(0.55)
    assert lr_at(1.0, 99, peak=1.0, warmup=10, min_frac=0.1) == pytest.approx(0.1)


def test_make_models_quick_end_to_end(tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from topd_ds.errors import ConfigError
    from topd_ds.tasks.make_models import main

    out = tmp_path / "arith"
    assert main(["--out", str(out), "--quick"]) == 0
    assert sorted(os.listdir(out)) == ["data", "report.json", "student", "teacher", "tokenizer"]
    assert sorted(os.listdir(tmp_path)) == ["arith"]  # the temp build dir was renamed away
    report = json.load(open(out / "report.json"))
    for role in ("teacher", "student"):
        entry = report[role]
        assert 0.0 <= entry["exact_match"] <= entry["accuracy"] <= 1.0
        model = AutoModelForCausalLM.from_pretrained(out / role)
        assert sum(p.numel() for p in model.parameters()) == entry["params"]
        assert AutoTokenizer.from_pretrained(out / role).get_vocab() == char_tokenizer.get_vocab()
    assert report["teacher"]["params"] > report["student"]["params"]
    evals = [json.loads(x) for x in open(out / "data" / "eval.jsonl")]
    train = [json.loads(x) for x in open(out / "data" / "train.jsonl")]
    assert len(evals) == report["n_eval"] == 16
    assert not {r["prompt"] for r in evals} & {r["prompt"] for r in train}
    with pytest.raises(ConfigError, match="--out: .* exists; pass --force"):
        main(["--out", str(out), "--quick"])
    # rebuild only the student: the teacher's weights and report entry are kept
    teacher_bytes = (out / "teacher" / "model.safetensors").read_bytes()
    assert main(["--out", str(out), "--quick", "--reuse-teacher", "--student-size", "8x1"]) == 0
    assert (out / "teacher" / "model.safetensors").read_bytes() == teacher_bytes
    again = json.load(open(out / "report.json"))
    assert again["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    assert (again["student"]["hidden"], again["student"]["layers"]) == (8, 1)
    with pytest.raises(ConfigError, match="--student-size: expected HIDDENxLAYERS"):
        main(["--out", str(out), "--quick", "--reuse-teacher", "--student-size", "big"])
    with pytest.raises(ConfigError, match="--reuse-teacher: .* was built with seed=0"):
        main(["--out", str(out), "--quick", "--reuse-teacher", "--seed", "5"])
