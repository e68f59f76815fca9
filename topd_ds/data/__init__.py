"""Data: prompt, response and eval sets from JSONL, Parquet and `datasets` folders, chat templates, padding.

    sources.py    rows by index from a file or folder (JSONL byte offsets, Parquet row groups, Arrow memory maps)
    fields.py     which field is the prompt / response / answer (prompt, problem, question, messages, ...)
    templates.py  chat messages -> prompt token ids (the tokenizer's chat template, or <bos> + plain text)
    prompts.py    PromptSet: indexed, tokenised when drawn, over-long prompts skipped and counted
    batching.py   pad_batch
"""

from topd_ds.data.batching import pad_batch
from topd_ds.data.prompts import Example, PromptSet, epoch_order, load_prompts, step_indices
from topd_ds.data.templates import PROMPT_SUFFIX_PRESETS, PromptFormat, PromptRenderer

__all__ = ["Example", "PromptSet", "PromptFormat", "PromptRenderer", "PROMPT_SUFFIX_PRESETS", "epoch_order",
           "load_prompts", "open_prompt_set", "pad_batch", "step_indices"]


def open_prompt_set(path: str, tokenizer, data_cfg, *, require_response: bool = False, eval_set: bool = False):
    """The PromptSet of `path` under the `data:` section of a config (topd_ds.config.DataConfig).
    `eval_set`: every row checked at start-up, no data.rows slice."""
    fmt = PromptFormat(chat_template=data_cfg.chat_template, system_prompt=data_cfg.system_prompt,
                       prompt_suffix=data_cfg.prompt_suffix, prompt_template=data_cfg.prompt_template,
                       enable_thinking=data_cfg.enable_thinking)
    return PromptSet.open(path, tokenizer, fmt, max_prompt_tokens=data_cfg.max_prompt_tokens,
                          on_long_prompt=data_cfg.on_long_prompt, require_response=require_response,
                          fields=data_cfg.fields, check_rows=None if eval_set else data_cfg.check_rows,
                          rows="" if eval_set else data_cfg.rows)
