"""The shared JSONL loader (one DataError line per problem, naming file:line) and batch padding."""

import json
import random

import pytest
import torch

from topd_ds.data import Example, load_prompts, pad_batch
from topd_ds.errors import DataError
from topd_ds.tasks import arith


def _write(tmp_path, content, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_loads_the_arith_export(tmp_path, char_tokenizer):
    tok = char_tokenizer
    train, _ = arith.make_splits(30, 5, seed=random.randrange(10**6))
    path = arith.write_jsonl(str(tmp_path / "t.jsonl"), train)
    examples = load_prompts(path, tokenizer=tok, max_prompt_tokens=64, require_response=True)
    assert len(examples) == 30
    for ex, p in zip(examples, train):
        assert isinstance(ex, Example)
        assert ex.prompt_ids == [tok.bos_token_id] + [tok.convert_tokens_to_ids(c) for c in p.prompt]
        assert ex.response_ids == [tok.convert_tokens_to_ids(c) for c in p.response] + [tok.eos_token_id]
        assert ex.answer == str(p.answer)
        assert ex.raw == p.as_record()


def test_prompt_only_blank_lines_and_template(tmp_path, char_tokenizer):
    path = _write(tmp_path, '{"prompt": "1+2="}\n\n   \n{"prompt": "3*4=", "answer": "12"}\n')
    examples = load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=8)
    assert [e.response_ids for e in examples] == [None, None]
    assert [e.answer for e in examples] == [None, "12"]
    wrapped = load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=16, prompt_template="({prompt})")
    assert char_tokenizer.decode(wrapped[0].prompt_ids[1:]) == "(1+2=)"
    # the limit counts <bos>: "1+2=" is 5 tokens
    assert len(load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=5)) == 2


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "1+2="}\n{"prompt": "1+2=",\n', r"d\.jsonl:2: invalid JSON: .* \(column \d+\)"),
    ('{"prompt": "1+2="}\n{"response": "3"}\n', r"d\.jsonl:2: missing field 'prompt'"),
    ('{"prompt": "  "}\n', r"d\.jsonl:1: field 'prompt' is empty"),
    ('{"prompt": "1+2+3+4+5+6="}\n', r"d\.jsonl:1: prompt has 13 tokens, more than max_prompt_tokens=8"),
    (b'{"prompt": "1+2="}\n{"prompt": "\xff\xfe"}\n', r"d\.jsonl:2: not valid UTF-8 \(byte 12\)"),
    ("", r"d\.jsonl: no examples \(empty file\)"),
    ("\n  \n", r"d\.jsonl: no examples \(empty file\)"),
    ('{"prompt": 12}\n', r"d\.jsonl:1: field 'prompt' must be a string, got int"),
    ('{"prompt": "1=", "response": ["1"]}\n', r"d\.jsonl:1: field 'response' must be a string, got list"),
    ('{"prompt": "1=", "answer": 1}\n', r"d\.jsonl:1: field 'answer' must be a string, got int"),
    ('["1+2="]\n', r"d\.jsonl:1: expected a JSON object, got list"),
])
def test_each_malformed_file_gives_one_line(tmp_path, char_tokenizer, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=8)
    assert "\n" not in str(info.value) and str(info.value).startswith(path)


def test_required_response_missing_and_unreadable_file(tmp_path, char_tokenizer):
    path = _write(tmp_path, '{"prompt": "1+2=", "response": "3"}\n{"prompt": "2+2="}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'response' \(required here\)"):
        load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=8, require_response=True)
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read"):
        load_prompts(str(tmp_path / "nope.jsonl"), tokenizer=char_tokenizer, max_prompt_tokens=8)
    with pytest.raises(DataError, match=r"prompt_template: must contain '\{prompt\}'"):
        load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=8, prompt_template="hi")


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_against_a_loop(side):
    rng = random.Random()
    seqs = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 9))] for _ in range(7)] + [[5]]
    ids, mask = pad_batch(seqs, 0, side=side)
    width = max(map(len, seqs))
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (8, width)
    for row, m, s in zip(ids.tolist(), mask.tolist(), seqs):
        pad = [0] * (width - len(s))
        assert row == (pad + s if side == "left" else s + pad)
        assert m == ([0] * len(pad) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(pad))
    with pytest.raises(ValueError, match="side: must be 'left' or 'right'"):
        pad_batch(seqs, 0, side="middle")


def test_json_roundtrip_of_user_records(tmp_path, char_tokenizer):
    records = [{"prompt": "1+2=", "response": "3", "extra": {"k": 1}}]
    path = _write(tmp_path, "\n".join(json.dumps(r) for r in records))  # no trailing newline
    (ex,) = load_prompts(path, tokenizer=char_tokenizer, max_prompt_tokens=8)
    assert ex.raw == records[0] and ex.answer is None
