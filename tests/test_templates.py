"""Chat templates (issue 17): the model's own template through apply_chat_template, BOS never doubled, the
template string as an override, a system prompt, the `boxed` suffix preset. Tokenizers are built offline
(tests/chat_tokenizers.py): a Qwen3-style ChatML one without <bos>, and a Llama-3-style one whose template starts
with {{ bos_token }} and whose tokenizer also adds <bos> on its own when asked for special tokens."""

import json
import random

import pytest
from chat_tokenizers import LLAMA3_TEMPLATE, QWEN3_TEMPLATE, save_chat_tokenizer

from topd_ds.data import PROMPT_SUFFIX_PRESETS, PromptFormat, PromptRenderer, load_prompts
from topd_ds.errors import ConfigError

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _random_text(rng):
    return "".join(rng.choice("abc xyz{}\\0123+=") for _ in range(rng.randrange(1, 30))).strip() or "q"


@pytest.mark.parametrize("style", ["qwen3", "llama3"])
@pytest.mark.parametrize("template_in", ["config", "jinja"])
def test_the_models_own_template_and_one_bos_at_most(tmp_path, style, template_in):
    """ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True) (transformers' own path, the
    independent reference) on random chats, with the template read from tokenizer_config.json or
    chat_template.jinja; <bos> appears exactly once for llama3, never for qwen3."""
    tok = _load(save_chat_tokenizer(style, str(tmp_path / style), template_in=template_in))
    render = PromptRenderer(tok, PromptFormat())
    rng = random.Random()
    for _ in range(20):
        turns = rng.choice([1, 3])
        messages = [{"role": ("user", "assistant")[k % 2], "content": _random_text(rng)} for k in range(turns)]
        ids = render.ids(messages)
        want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids == list(want)
        n_bos = ids.count(tok.bos_token_id) if tok.bos_token_id is not None else 0
        assert n_bos == (1 if style == "llama3" else 0) and (style == "qwen3" or ids[0] == tok.bos_token_id)
        if style == "llama3":  # the trap: the rendered text encoded with special tokens has two
            naive = tok(render.text(messages))["input_ids"]
            assert naive[:2] == [tok.bos_token_id] * 2


def test_template_override_system_prompt_and_boxed_preset(tmp_path):
    tok = _load(save_chat_tokenizer("qwen3", str(tmp_path / "q")))
    q = [{"role": "user", "content": "What is 1+2?"}]
    fmt = PromptFormat(system_prompt="Be brief.", prompt_suffix="boxed")
    assert PROMPT_SUFFIX_PRESETS["boxed"] == "\n" + BOXED
    text = PromptRenderer(tok, fmt).text(q)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+2?\n" + BOXED +
                    "<|im_end|>\n<|im_start|>assistant\n")
    # a row's own system turn is kept; the option adds one only where there is none
    own = [{"role": "system", "content": "Mine."}] + q
    assert PromptRenderer(tok, fmt).text(own).startswith("<|im_start|>system\nMine.<|im_end|>")
    # the template string overrides the tokenizer's: the Llama-3 one on the ChatML tokenizer (no bos_token: '')
    over = PromptRenderer(tok, PromptFormat(chat_template=LLAMA3_TEMPLATE))
    assert over.text(q) == "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+2?<|eot_id|>" \
                           "<|start_header_id|>assistant<|end_header_id|>\n\n"
    (tmp_path / "t.jinja").write_text(QWEN3_TEMPLATE)
    llama = _load(save_chat_tokenizer("llama3", str(tmp_path / "l")))
    from_file = PromptRenderer(llama, PromptFormat(chat_template=str(tmp_path / "t.jinja")))
    assert from_file.text(q) == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    # none: plain text and one <bos>, also when the template text already starts with it
    plain = PromptRenderer(llama, PromptFormat(chat_template="none", prompt_template="<|begin_of_text|>Q: {prompt}"))
    assert plain.ids(q).count(llama.bos_token_id) == 1
    assert PromptRenderer(llama, PromptFormat(chat_template="none")).ids(q)[0] == llama.bos_token_id


def test_option_errors_are_one_config_line(tmp_path):
    tok = _load(save_chat_tokenizer("qwen3", str(tmp_path / "q")))
    cases = [
        (PromptFormat(prompt_template="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
         "data.prompt_template: contains the special token '<|im_start|>' (a chat format) while "
         "data.chat_template=auto applies a chat template too"),
        (PromptFormat(chat_template="no-such.jinja"),
         "data.chat_template: neither auto, none, a Jinja template nor an existing file: 'no-such.jinja'"),
        (PromptFormat(chat_template="{% for m in messages %}{{ m.content }"),
         "data.chat_template: cannot render a one-turn chat: TemplateSyntaxError"),
        (PromptFormat(chat_template="none", system_prompt="hi"),
         "data.system_prompt: needs a chat template, and data.chat_template=none gives plain text"),
    ]
    for fmt, message in cases:
        with pytest.raises(ConfigError) as err:
            PromptRenderer(tok, fmt)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_loader_uses_the_template_and_counts_it_in_the_limit(tmp_path):
    """Through the loader: the prompt length counts the template's tokens; ShareGPT rows render as chats."""
    tok = _load(save_chat_tokenizer("llama3", str(tmp_path / "l")))
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "1+2="},
                               {"from": "gpt", "value": "\\boxed{3}"}]}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    (ex,) = load_prompts(str(path), tokenizer=tok, max_prompt_tokens=10**4)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+2="}]
    assert ex.prompt_ids == list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert ex.answer == "3" and ex.response_ids[-1] == tok.eos_token_id
    from topd_ds.errors import DataError
    with pytest.raises(DataError, match=rf"c\.jsonl:1: prompt has {len(ex.prompt_ids)} tokens"):
        load_prompts(str(path), tokenizer=tok, max_prompt_tokens=len(ex.prompt_ids) - 1)


def test_enable_thinking_reaches_the_template(tmp_path):
    """Qwen3 hybrid templates read `enable_thinking` (the paper ran with it False); unset, nothing is passed."""
    tok = _load(save_chat_tokenizer("qwen3", str(tmp_path / "q")))
    template = QWEN3_TEMPLATE + "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    q = [{"role": "user", "content": "1+2?"}]
    off = PromptRenderer(tok, PromptFormat(chat_template=template, enable_thinking=False)).text(q)
    unset = PromptRenderer(tok, PromptFormat(chat_template=template)).text(q)
    assert off == unset + "<think>\n\n</think>\n\n"
    assert unset == tok.apply_chat_template(q, chat_template=template, add_generation_prompt=True, tokenize=False)
