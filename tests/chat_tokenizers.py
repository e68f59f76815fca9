"""Chat tokenizers built offline for the template tests: character-level over printable ASCII plus the special
tokens and chat template of two families.

* qwen3: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), no <bos> (bos_token is None), eos `<|im_end|>`.
* llama3: template starts with `{{ bos_token }}`; the tokenizer also adds <bos> itself when asked to add special
  tokens (as Llama 3's post-processor does), so rendering then encoding with add_special_tokens=True would
  double it: the case the loader must not fall into.
"""

import json
import os
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "")

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

STYLES = {
    "qwen3": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", template=QWEN3_TEMPLATE),
    "llama3": dict(specials=["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                             "<|end_header_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                   pad="<|finetune_right_pad_id|>", template=LLAMA3_TEMPLATE),
}


def build_chat_tokenizer(style: str):
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    vocab = {tok: i for i, tok in enumerate(spec["specials"] + ["<unk>"])}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(spec["specials"])
    if spec["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], vocab[spec["bos"]])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"], unk_token="<unk>", chat_template=spec["template"],
                                   clean_up_tokenization_spaces=False)


def save_chat_tokenizer(style: str, out: str, *, template_in: str = "config") -> str:
    """Save with the template in tokenizer_config.json ("config") or in chat_template.jinja ("jinja")."""
    tok = build_chat_tokenizer(style)
    tok.save_pretrained(out)
    config_path = os.path.join(out, "tokenizer_config.json")
    jinja_path = os.path.join(out, "chat_template.jinja")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("chat_template", None)
    if os.path.exists(jinja_path):
        os.remove(jinja_path)
    if template_in == "config":
        config["chat_template"] = STYLES[style]["template"]
    else:
        with open(jinja_path, "w") as f:
            f.write(STYLES[style]["template"])
    with open(config_path, "w") as f:
        json.dump(config, f)
    return out
