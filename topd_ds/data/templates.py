"""Prompt token ids from chat messages: the model's own chat template, or plain text for chat-free models.

    fmt = PromptFormat(chat_template="auto", system_prompt=None, prompt_suffix="boxed")
    render = PromptRenderer(tokenizer, fmt)       # checks the options once (ConfigError lines)
    ids = render.ids([{"role": "user", "content": "What is 2+3?"}])

* `chat_template: auto` (default) uses the template the tokenizer was saved with (its tokenizer_config.json or
  chat_template.jinja): `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. A tokenizer without
  one (the arith task's) gets plain text. `none` forces plain text; anything else is a Jinja template string,
  or a path to a .jinja file, used instead of the tokenizer's.
* Plain text is `<bos> + text`; `<bos>` is added only when the tokenizer has one and the text does not already
  begin with it. With a template, the template alone decides: ids are the template's text tokenised with
  add_special_tokens=False (exactly what apply_chat_template(tokenize=True) does), so a template that writes
  `{{ bos_token }}` (Llama 3) has one `<bos>` and a template without it (Qwen3's ChatML) has none.
* `enable_thinking` (when set) is passed to the template, as Qwen3's hybrid templates read it (the paper ran
  with thinking disabled; the Instruct-2507 models' templates ignore it).
* `prompt_template` wraps the user's text (`{prompt}` is replaced as plain text, so `\\boxed{}` and other braces
  are safe), then `prompt_suffix` is appended; `system_prompt` is a system turn for rows that have none.
"""

import os
from dataclasses import dataclass

from topd_ds.errors import ConfigError, DataError

# `prompt_suffix` presets: the instruction math evaluations (AIME/HMMT) append to every problem
PROMPT_SUFFIX_PRESETS = {
    "boxed": "\nPlease reason step by step, and put your final answer within \\boxed{}.",
}


@dataclass(frozen=True)
class PromptFormat:
    chat_template: str = "auto"     # auto | none | a Jinja template | a .jinja file
    system_prompt: str | None = None
    prompt_suffix: str = ""         # text, or a PROMPT_SUFFIX_PRESETS name
    prompt_template: str = "{prompt}"
    enable_thinking: bool | None = None  # passed to the template when set (Qwen3 hybrid models; paper: False)


def suffix_text(suffix: str) -> str:
    return PROMPT_SUFFIX_PRESETS.get(suffix, suffix)


def _template_of(tokenizer, chat_template: str, key: str):
    """The Jinja source to render with, or None for plain text."""
    if chat_template == "none":
        return None
    if chat_template == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one renders chats
            template = template.get("default")
        return template or None
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    raise ConfigError(f"{key}: neither auto, none, a Jinja template nor an existing file: {chat_template!r}")


class PromptRenderer:
    """Messages -> prompt token ids under one PromptFormat (see the module docstring)."""

    def __init__(self, tokenizer, fmt: PromptFormat, *, key: str = "data"):
        """`key` names the options in errors: "data" -> data.chat_template, "--" -> --chat-template (the CLI)."""
        self.tokenizer, self.fmt = tokenizer, fmt

        def name(option):
            return "--" + option.replace("_", "-") if key == "--" else f"{key}.{option}"
        if "{prompt}" not in fmt.prompt_template:
            raise ConfigError(f"{name('prompt_template')}: must contain '{{prompt}}', got {fmt.prompt_template!r}")
        self.template = _template_of(tokenizer, fmt.chat_template, f"{name('chat_template')}")
        self.suffix = suffix_text(fmt.prompt_suffix)
        self.bos_id = tokenizer.bos_token_id
        if self.template is None:
            if fmt.system_prompt:
                raise ConfigError(f"{name('system_prompt')}: needs a chat template, and "
                                  f"{name('chat_template')}={fmt.chat_template} gives plain text")
            return
        specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        specials = sorted((t for t in specials | set(tokenizer.all_special_tokens) if t and t in fmt.prompt_template),
                          key=fmt.prompt_template.index)
        if specials:  # a hand-written chat format inside the tokenizer's own would be applied twice
            raise ConfigError(f"{name('prompt_template')}: contains the special token {specials[0]!r} (a chat format) "
                              f"while {name('chat_template')}={fmt.chat_template} applies a chat template too; "
                              f"set {name('chat_template')}: none to keep yours, or keep only '{{prompt}}' there")
        try:
            self.ids([{"role": "user", "content": "1"}])
        except Exception as err:  # jinja2 errors, a template that needs other roles, ...
            raise ConfigError(f"{name('chat_template')}: cannot render a one-turn chat: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    def messages(self, messages: list) -> list:
        """The chat with the user's last turn wrapped and suffixed, and the system prompt added."""
        last = messages[-1]
        text = self.fmt.prompt_template.replace("{prompt}", last["content"]) + self.suffix
        out = [*messages[:-1], {"role": last["role"], "content": text}]
        if self.fmt.system_prompt and out[0]["role"] != "system":
            out = [{"role": "system", "content": self.fmt.system_prompt}] + out
        return out

    def text(self, messages: list, where: str = "") -> str:
        """The prompt as text (template applied; plain text has no <bos> here)."""
        messages = self.messages(messages)
        if self.template is None:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise DataError(f"{where}: a conversation of {len(messages)} turns needs a chat template, and the "
                                f"tokenizer has none (set data.chat_template / --chat-template)")
            return messages[0]["content"]
        extra = {} if self.fmt.enable_thinking is None else {"enable_thinking": self.fmt.enable_thinking}
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, add_generation_prompt=True,
                                                  tokenize=False, **extra)

    def ids(self, messages: list, where: str = "") -> list:
        text = self.text(messages, where)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if self.template is None and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id] + ids  # plain text: <bos> once (a prompt_template may already start with it)
        return ids
