"""The shared JSONL loader (one DataError line per problem, naming file:line) and batch padding."""

import json
import random

import pytest
import torch

from topd_ds.data import Example, load_prompts, pad_batch
from topd_ds.errors import ConfigError, DataError
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
    ('{"prompt": 12}\n', r"d\.jsonl:1: field 'prompt' must be a string or a list of messages, got int"),
    ('{"prompt": "1=", "response": ["1"]}\n', r"d\.jsonl:1: field 'response' must be a string, got list"),
    ('{"prompt": "1=", "answer": [1]}\n', r"d\.jsonl:1: field 'answer' must be a string or a number, got list"),
    ('{"prompt": "1=", "answer": true}\n', r"d\.jsonl:1: field 'answer' must be a string or a number, got bool"),
    ('{"messages": [{"role": "user", "content": "1="}, {"role": "robot", "content": "2"}]}\n',
     r"d\.jsonl:1: field 'messages\[1\]'\.role is 'robot'; expected one of system, user, assistant"),
    ('{"conversations": [{"from": "gpt", "value": "2"}]}\n', r"d\.jsonl:1: field 'conversations' has no user turn"),
    ('{"conversations": [{"from": "human", "value": 3}]}\n',
     r"d\.jsonl:1: field 'conversations\[0\]'\.value must be a string, got int"),
    ('{"messages": [{"text": "1="}]}\n', r"d\.jsonl:1: field 'messages\[0\]' has neither 'role'/'content'"),
    ('{"messages": []}\n', r"d\.jsonl:1: field 'messages' must be a non-empty list of messages, got an empty list"),
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
    with pytest.raises(ConfigError, match=r"prompt_template: must contain '\{prompt\}'"):
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


# ---- issue 17: data as users have it -----------------------------------------------------------------------
def test_byte_order_mark_and_crlf_are_accepted(tmp_path, char_tokenizer):
    """A JSONL file saved with a UTF-8 BOM and CRLF line ends (Windows editors, spreadsheet exports) loads as
    the same examples as a plain one; line numbers in errors still count from the file's first line."""
    plain = _write(tmp_path, '{"prompt": "1+2="}\n{"prompt": "3*4=", "answer": "12"}\n', "plain.jsonl")
    windows = _write(tmp_path, b'\xef\xbb\xbf{"prompt": "1+2="}\r\n\r\n{"prompt": "3*4=", "answer": "12"}\r\n',
                     "win.jsonl")
    a = load_prompts(plain, tokenizer=char_tokenizer, max_prompt_tokens=8)
    b = load_prompts(windows, tokenizer=char_tokenizer, max_prompt_tokens=8)
    assert [(e.prompt_ids, e.answer, e.raw) for e in a] == [(e.prompt_ids, e.answer, e.raw) for e in b]
    bad = _write(tmp_path, b'\xef\xbb\xbf{"prompt": "1+2="}\r\n\r\n{"prompt": 1+}\r\n', "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_prompts(bad, tokenizer=char_tokenizer, max_prompt_tokens=8)


def test_braces_in_the_prompt_template_are_text(tmp_path, char_tokenizer):
    """`{prompt}` is replaced as text: `\\boxed{}` in a template (docs/EVAL.md's AIME command) used to raise
    IndexError from str.format."""
    from topd_ds.tasks.chartok import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+-*()={}\\abcdeghilmnoprstvwxy ")
    path = _write(tmp_path, '{"prompt": "1+2="}\n')
    (ex,) = load_prompts(path, tokenizer=tok, max_prompt_tokens=64, prompt_template="{prompt} in \\boxed{}")
    assert tok.decode(ex.prompt_ids[1:]) == "1+2= in \\boxed{}"


def _rows_openthoughts():
    """OpenThoughts3-shaped rows: ShareGPT `conversations` (human/gpt) with a boxed final answer."""
    rows = []
    for i in range(7):
        a, b = random.randrange(10), random.randrange(10)
        rows.append({"difficulty": i, "source": "math", "domain": "math",
                     "conversations": [{"from": "human", "value": f"{a}+{b}="},
                                       {"from": "gpt", "value": f"{a}+{b}=\\boxed{{{a + b}}}"}]})
    return rows


def _tok():
    from topd_ds.tasks.chartok import build_char_tokenizer

    return build_char_tokenizer("0123456789+-*()={}\\abcdefghijklmnopqrstuvwxyz ")


def _ids(tok, text):
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def test_openthoughts_shaped_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows_openthoughts()
    path = str(tmp_path / "ot3.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # 3 row groups: reads cross them
    tok = _tok()
    examples = load_prompts(path, tokenizer=tok, max_prompt_tokens=64, require_response=True)
    assert len(examples) == 7
    for ex, row in zip(examples, rows):
        human, gpt = row["conversations"][0]["value"], row["conversations"][1]["value"]
        assert ex.prompt_ids == _ids(tok, human)
        assert ex.response_ids == tok.encode(gpt, add_special_tokens=False) + [tok.eos_token_id]
        assert ex.answer == gpt.split("{")[1].rstrip("}")
    # the same rows in a folder of Parquet files (a Hugging Face dataset repository's data/ layout)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), str(tmp_path / "repo" / "data" / "train-00000-of-00002.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[4:]), str(tmp_path / "repo" / "data" / "train-00001-of-00002.parquet"))
    again = load_prompts(str(tmp_path / "repo"), tokenizer=tok, max_prompt_tokens=64)
    assert [e.prompt_ids for e in again] == [e.prompt_ids for e in examples]


def test_parquet_errors_name_file_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows_openthoughts()
    rows[5]["conversations"][0]["from"] = "narrator"
    path = str(tmp_path / "ot3.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer=_tok(), max_prompt_tokens=64)
    assert str(err.value).startswith(f"{path}: row 5: field 'conversations[0]'.from is 'narrator'; expected one of")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_prompts(str(tmp_path / "broken.parquet"), tokenizer=_tok(), max_prompt_tokens=64)


def test_messages_jsonl_with_system_and_assistant_turns(tmp_path):
    """OpenAI-style `messages`: the prompt is every turn up to the last user turn, the final assistant turn is
    the response; without a chat template a multi-turn prompt is one clear error."""
    from topd_ds.data import PromptFormat, PromptSet

    tok = _tok()
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                          {"role": "user", "content": "2+3="}, {"role": "assistant", "content": "\\boxed{5}"}]},
            {"messages": [{"role": "user", "content": "4*2="}]}]
    path = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows[::-1]), "m.jsonl")
    ps = PromptSet.open(path, tok, PromptFormat(chat_template="none"), max_prompt_tokens=64, check_rows=1)
    with pytest.raises(DataError, match=r"m\.jsonl:2: a conversation of 3 turns needs a chat template"):
        ps[1]   # met when drawn: row 2 is past check_rows
    single = _write(tmp_path, json.dumps(rows[1]) + "\n", "one.jsonl")
    (ex,) = load_prompts(single, tokenizer=tok, max_prompt_tokens=64)
    assert ex.prompt_ids == _ids(tok, "4*2=") and ex.response_ids is None and ex.answer is None


def test_question_solution_set(tmp_path):
    """MATH/GSM-style rows: `question` + `solution`; the answer is the solution's last \\boxed{} (nested braces
    kept); an explicit `answer` wins, numbers are accepted; without either, require_answer names the row."""
    from topd_ds.data import PromptFormat, PromptSet

    tok = _tok()
    rows = [{"question": "1+2=", "solution": "first \\boxed{2} no, 1+2=\\boxed{3}"},
            {"question": "a=", "solution": "so a=\\boxed{\\frac{1}{2}}"},
            {"question": "2*2=", "solution": "4", "answer": 4},
            {"question": "7=", "solution": "seven"}]
    path = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), "q.jsonl")
    examples = load_prompts(path, tokenizer=tok, max_prompt_tokens=64)
    assert [e.answer for e in examples] == ["3", "\\frac{1}{2}", "4", None]
    assert examples[0].response_ids[:-1] == tok.encode(rows[0]["solution"], add_special_tokens=False)
    with pytest.raises(DataError, match=r"q\.jsonl:4: no 'answer'"):
        list(PromptSet.open(path, tok, PromptFormat(), max_prompt_tokens=64, require_answer=True))


def test_datasets_save_to_disk_folder(tmp_path):
    import datasets

    rows = [{"problem": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "one_split"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two_splits"))
    tok = _tok()
    for folder in ("flat", "one_split", str(tmp_path / "two_splits" / "test")):
        examples = load_prompts(str(tmp_path / folder), tokenizer=tok, max_prompt_tokens=64)
        assert [e.prompt_ids for e in examples] == [_ids(tok, r["problem"]) for r in rows]
        assert [e.answer for e in examples] == [r["answer"] for r in rows]
    with pytest.raises(DataError, match=r"two_splits: holds the splits train, test; name one folder"):
        load_prompts(str(tmp_path / "two_splits"), tokenizer=tok, max_prompt_tokens=64)
    datasets.Dataset.from_list([{"problem": "1="}, {"problem": ""}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 1: field 'problem' is empty"):
        load_prompts(str(tmp_path / "bad"), tokenizer=tok, max_prompt_tokens=64)


def test_field_mapping(tmp_path):
    from topd_ds.data.fields import check_mapping

    tok = _tok()
    rows = [{"instruction": "1+2=", "output": "3", "gt": 3, "prompt": "ignored"}]
    path = _write(tmp_path, json.dumps(rows[0]) + "\n", "f.jsonl")
    (ex,) = load_prompts(path, tokenizer=tok, max_prompt_tokens=64,
                         fields={"prompt": "instruction", "response": "output", "answer": "gt"})
    assert ex.prompt_ids == _ids(tok, "1+2=") and ex.answer == "3"
    assert ex.response_ids == tok.encode("3", add_special_tokens=False) + [tok.eos_token_id]
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing field 'query' \(data\.fields\.prompt\)"):
        load_prompts(path, tokenizer=tok, max_prompt_tokens=64, fields={"prompt": "query"})
    with pytest.raises(ConfigError, match=r"data\.fields\.promt: unknown role"):
        check_mapping({"promt": "x"})


def _prompt_set(tmp_path, texts, *, check_rows=None, on_long_prompt="skip", name="p.jsonl", max_tokens=6):
    from topd_ds.data import PromptFormat, PromptSet

    path = _write(tmp_path, "".join(json.dumps({"prompt": t}) + "\n" for t in texts), name)
    return PromptSet.open(path, _tok(), PromptFormat(), max_prompt_tokens=max_tokens,
                          on_long_prompt=on_long_prompt, check_rows=check_rows)


def test_over_long_prompts_are_skipped_and_counted(tmp_path):
    rng = random.Random()
    texts = ["1" * rng.randrange(1, 9) for _ in range(40)]   # 1..8 chars + <bos>: limit 6 keeps <= 5 chars
    long = {i for i, t in enumerate(texts) if len(t) + 1 > 6}
    ps = _prompt_set(tmp_path, texts)
    assert len(ps) == 40 - len(long) and ps.n_long == len(long)
    assert [len(e.prompt_ids) - 1 for e in ps] == [len(t) for i, t in enumerate(texts) if i not in long]
    assert f"{len(long):,} over max_prompt_tokens=6 skipped" in ps.summary()
    with pytest.raises(DataError, match=r"p\.jsonl:\d+: prompt has \d+ tokens, more than max_prompt_tokens=6"):
        _prompt_set(tmp_path, texts + ["1" * 9], on_long_prompt="error")
    with pytest.raises(DataError, match=r"all 2 prompts are longer than max_prompt_tokens=6"):
        _prompt_set(tmp_path, ["1" * 9, "2" * 9])


def test_rows_past_the_checked_ones_are_skipped_when_drawn(tmp_path):
    """With only the first rows checked, an over-long row met later is replaced by the same row every time
    (so a step's prompts depend only on (seed, step)), and the count grows as they are met."""
    texts = [str(i % 10) * (1 + i % 7) for i in range(60)]   # lengths 1..7: 7 chars + <bos> is over 6
    ps = _prompt_set(tmp_path, texts, check_rows=5)
    assert ps.n_long == 0 and len(ps) == 60
    drawn = [ps.for_step(step, 4, seed=3, shuffle=True) for step in range(30)]   # two epochs
    assert all(len(e.prompt_ids) <= 6 for batch in drawn for e in batch)
    long = {i for i, t in enumerate(texts) if len(t) > 5}
    assert ps.long_rows == long   # every row was drawn: all found
    again = _prompt_set(tmp_path, texts, check_rows=5)
    assert [[e.prompt_ids for e in again.for_step(s, 4, seed=3, shuffle=True)] for s in reversed(range(30))] == \
        [[e.prompt_ids for e in b] for b in reversed(drawn)]   # any order of steps (a resume) gives the same
    assert "found while drawing" in ps.summary()


def test_for_step_is_the_old_order_when_nothing_is_skipped(tmp_path):
    """The demo's prompts per step are unchanged: the reference is the pre-issue-17 formula, written out."""
    texts = [str(i % 10) + "+" + str(i % 7) + "=" for i in range(23)]
    ps = _prompt_set(tmp_path, texts)
    for seed, shuffle, per_step in ((0, True, 8), (5, True, 3), (1, False, 4)):
        for step in range(12):
            epoch, offset = divmod(step * per_step, len(texts))
            order = list(range(len(texts)))
            if shuffle:
                random.Random(seed * 1_000_003 + epoch).shuffle(order)
            want = [texts[order[(offset + i) % len(order)]] for i in range(per_step)]
            got = [e.raw["prompt"] for e in ps.for_step(step, per_step, seed=seed, shuffle=shuffle)]
            assert got == want


def test_rows_slice(tmp_path):
    from topd_ds.data import PromptFormat, PromptSet

    texts = [str(i % 10) for i in range(30)]
    path = _write(tmp_path, "".join(json.dumps({"prompt": t, "i": i}) + "\n" for i, t in enumerate(texts)), "r.jsonl")
    ps = PromptSet.open(path, _tok(), PromptFormat(), max_prompt_tokens=8, rows="20:25")
    assert [e.raw["i"] for e in ps] == [20, 21, 22, 23, 24]
    with pytest.raises(DataError, match=r"data\.rows: expected start:stop"):
        PromptSet.open(path, _tok(), PromptFormat(), max_prompt_tokens=8, rows="20-25")
    with pytest.raises(DataError, match=r"data\.rows: '40:50' selects no row"):
        PromptSet.open(path, _tok(), PromptFormat(), max_prompt_tokens=8, rows="40:50")


def test_jsonl_index_against_a_split(tmp_path, monkeypatch):
    """The byte-offset index (chunked numpy scan) equals splitting the bytes on '\\n' and dropping blank lines, on
    random files with blank/whitespace lines, CRLF, a BOM, with and without a final newline; chunks of 7 bytes
    put lines across every chunk boundary."""
    import os

    import topd_ds.data.sources as sources

    monkeypatch.setattr(sources, "_CHUNK", 7)
    rng = random.Random()
    for trial in range(200):
        lines = [rng.choice(['{"a": 1}', "", "  ", ' {"b": 2}', "\t", "{}", "\r", '{"c": "x y"}\r'])
                 for _ in range(rng.randrange(0, 12))]
        data = ("\n".join(lines) + rng.choice(["", "\n", "\r\n"])).encode()
        if rng.random() < 0.3:
            data = b"\xef\xbb\xbf" + data
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes(data)
        src = sources.JsonlSource(str(path))
        text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        want = [(i + 1, line) for i, line in enumerate(text.split(b"\n")) if line.strip()]
        got = [(int(src.where(k).rsplit(":", 1)[1]),
                os.pread(src._fd, int(src.ends[k] - src.starts[k]), int(src.starts[k]))) for k in range(len(src))]
        assert got == want, data
        src.close()
