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
