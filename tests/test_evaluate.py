"""Answer extraction and pass@1 averaging (the server side is covered by the conformance suite)."""

import asyncio

import pytest

from topd_ds.engines.protocol import Completion
from topd_ds.evaluate import final_answer, is_correct, pass_at_1


@pytest.mark.parametrize("text,answer", [
    ("5+6=11", "11"), ("so the answer is \\boxed{42}.", "42"), ("\\boxed{1} then \\boxed{ 7 }", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("3*4=12", "12"),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_is_correct():
    assert is_correct("5+6=11", "11") and not is_correct("5+6=12", "11")
    assert is_correct("x = \\boxed{3}", "3") and not is_correct("no answer", "3")


class FakeClient:
    """Returns fixed texts as token ids (one char = one id) so the averaging can be checked by hand."""

    def __init__(self, texts):
        self.texts = texts

    async def generate(self, prompts, params, *, n=1):
        return [[Completion(output_ids=[ord(c) for c in t], logprobs=[0.0] * len(t), finish_reason="stop")
                 for t in self.texts[i][:n]] for i in range(len(prompts))]


def test_pass_at_1_averages_samples_then_problems():
    client = FakeClient([["=3", "=4", "=3", "=3"], ["=9", "=9", "=8", "=1"]])
    r = asyncio.run(pass_at_1(client, [[1], [2]], ["3", "9"], lambda ids: "".join(map(chr, ids)), n=4))
    assert r["pass@1"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert r["n_problems"] == 2 and r["samples"] == ["=3", "=9"]


def test_math_verify_equates_forms_of_one_number():
    assert is_correct("so \\boxed{0.5}", "\\frac{1}{2}") and not is_correct("so \\boxed{0.4}", "\\frac{1}{2}")


def test_eval_command_on_a_built_in_server(tiny_models, tmp_path):
    """`topd-ds eval` twice on the same greedy server: the second set's answers are the model's own answers
    for every other problem, so its pass@1 must be exactly that share; sets use the `problem` field."""
    import json
    import os

    from topd_ds import evaluate
    from topd_ds.tasks.arith import make_splits

    problems, _ = make_splits(12, 1, seed=int.from_bytes(os.urandom(2), "little"), depth=2)
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"problem": p.prompt, "answer": str(p.answer)}) + "\n" for p in problems))
    common = ["--model", tiny_models[1], "--n", "2", "--temperature", "0", "--max-new-tokens", "10"]
    assert evaluate.main([*common, "--data", str(first), "--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12))
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"problem": p.prompt, "answer": evaluate.final_answer(r["response"])
                                       if i % 2 == 0 else "not-a-number"}) + "\n"
                           for i, (p, r) in enumerate(zip(problems, rows))))
    assert evaluate.main([*common, "--data", str(own), "--data", str(first), "--out", str(tmp_path / "b")]) == 0
    table = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert table["own"]["pass@1"] == pytest.approx(0.5) and table["own"]["n_problems"] == 12
    assert table["first"]["pass@1"] == json.loads((tmp_path / "a" / "eval.json").read_text())["first"]["pass@1"]
    assert table["average"]["pass@1"] == pytest.approx((table["own"]["pass@1"] + table["first"]["pass@1"]) / 2)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "b" / "tb"))


def test_eval_rejects_a_set_without_answers(tiny_models, tmp_path):
    from topd_ds import evaluate
    from topd_ds.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+2="}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: example 1 has no 'answer'"):
        evaluate.main(["--model", tiny_models[1], "--data", str(bad)])


def test_request_timeout_scales_with_max_new_tokens(tiny_models, tmp_path, monkeypatch):
    """The client of `topd-ds eval` gets 600 s + 0.1 s per new token (32k-token AIME responses needed more than
    the fixed 600 s); --timeout-s overrides it."""
    import topd_ds.engines.sglang
    from topd_ds import evaluate

    seen = []

    class Recorder:
        def __init__(self, urls, **kwargs):
            seen.append(kwargs["timeout_s"])
            raise RuntimeError("recorded")

    monkeypatch.setattr(topd_ds.engines.sglang, "SGLangClient", Recorder)
    data = tmp_path / "s.jsonl"
    data.write_text('{"problem": "1+2=", "answer": "3"}\n')
    common = ["--url", "http://127.0.0.1:9", "--tokenizer", tiny_models[1], "--data", str(data)]
    for extra, want in ((["--max-new-tokens", "32768"], 600 + 0.1 * 32768), ([], 600 + 0.1 * 256),
                        (["--max-new-tokens", "32768", "--timeout-s", "50"], 50.0)):
        with pytest.raises(RuntimeError, match="recorded"):
            evaluate.main(common + extra)
        assert seen[-1] == pytest.approx(want)


def test_prompt_set_tokenises_responses_only_when_asked(tmp_path, char_tokenizer):
    """Responses are thousands of tokens in real sets: a prompt set tokenises them only for stage 1 on the data."""
    from topd_ds.data import PromptFormat, PromptSet

    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "1+2=", "response": "1+2=3"}\n')
    (plain,) = PromptSet.open(str(path), char_tokenizer, PromptFormat(), max_prompt_tokens=8)
    (kd,) = PromptSet.open(str(path), char_tokenizer, PromptFormat(), max_prompt_tokens=8, require_response=True)
    assert plain.response_ids is None and plain.raw["response"] == "1+2=3"
    assert kd.response_ids == char_tokenizer.encode("1+2=3", add_special_tokens=False) + [char_tokenizer.eos_token_id]
