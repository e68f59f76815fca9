"""Prompt sets: rows of a source (sources.py) -> token ids, read and tokenised when drawn, not up front.

    ps = PromptSet.open("train.parquet", tokenizer, fmt, max_prompt_tokens=800)
    len(ps); ps[k] -> Example; ps.for_step(step, 8, seed=0, shuffle=True) -> 8 Examples

Start-up reads the source's index (sources.py) and checks the first `check_rows` rows (all rows of a smaller
set): every one is parsed, templated and tokenised, so a wrong field or a template error is one line before any
model loads, and the over-long ones among them are left out of the set. Later rows are checked when first drawn:
a malformed one stops the run with the same line; an over-long one is skipped and its place taken by a row drawn
by a seeded hash of its index (the same one every time), so a step's prompts still depend only on (seed, step)
and a resumed run sees the same data. Memory: the source's index, the candidate rows (8 bytes each), one
epoch's order (8 bytes each) and the over-long rows found; no example is kept.

Token layout: prompt_ids = the chat template's tokens (or <bos> + text), see templates.py;
response_ids = tokens(response) + [<eos>].
"""

import random
from dataclasses import dataclass

import numpy as np

from topd_ds.data.fields import extract
from topd_ds.data.sources import open_source
from topd_ds.data.templates import PromptFormat, PromptRenderer
from topd_ds.errors import DataError

MAX_REFILL_DRAWS = 1000  # draws for a row within the limit before a set is called all over-long


@dataclass(frozen=True)
class Example:
    """One loaded example: token ids of the prompt (and of the response when the set tokenises responses), the
    answer if given, the raw record."""

    prompt_ids: list
    response_ids: list | None
    answer: str | None
    raw: dict


def parse_rows(text: str, n_rows: int, key: str = "data.rows") -> range:
    """'start:stop' (Python slice, either side may be empty) -> a range of row indices."""
    if not text:
        return range(n_rows)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise DataError(f"{key}: expected start:stop (e.g. 20000:30000), got {text!r}") from None
    return range(n_rows)[slice(start, stop)]


_ORDER_CACHE: dict = {}


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of n items in one epoch: `random.Random(seed * 1_000_003 + epoch).shuffle(range(n))`, kept as
    an int64 array (8 bytes per item) and cached for the epoch (a 1.2M-row set takes ~1 s to shuffle)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    key = (n, seed, epoch)
    order = _ORDER_CACHE.get(key)
    if order is None:
        items = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(items)
        order = np.asarray(items, dtype=np.int64)
        _ORDER_CACHE.clear()  # one epoch at a time
        _ORDER_CACHE[key] = order
    return order


def step_indices(n: int, step: int, per_step: int, *, seed: int, shuffle: bool) -> list:
    """Indices of the `per_step` items of `step`: consecutive slots of the epoch's order (wrapping within it)."""
    epoch, offset = divmod(step * per_step, n)
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    return [int(order[(offset + i) % n]) for i in range(per_step)]


class PromptSet:
    """An indexed, lazily tokenised prompt set; see the module docstring."""

    def __init__(self, source, renderer: PromptRenderer, *, max_prompt_tokens: int, on_long_prompt: str = "skip",
                 require_response: bool = False, require_answer: bool = False, fields: dict | None = None,
                 check_rows: int | None = None, rows: str = "", name: str = "",
                 tokenize_responses: bool | None = None):
        if on_long_prompt not in ("skip", "error"):
            raise ValueError(f"on_long_prompt: must be 'skip' or 'error', got {on_long_prompt!r}")
        self.source, self.renderer = source, renderer
        self.max_prompt_tokens, self.on_long_prompt = max_prompt_tokens, on_long_prompt
        self.require_response, self.require_answer = require_response, require_answer
        # response ids cost more than the prompt's (thousands of tokens): only when asked for (stage 1 on the data)
        self.tokenize_responses = require_response if tokenize_responses is None else tokenize_responses
        self.fields = dict(fields or {})
        self.name = name or getattr(source, "path", None) or getattr(source, "label", "")
        self.eos = [renderer.tokenizer.eos_token_id] if renderer.tokenizer.eos_token_id is not None else []
        chosen = parse_rows(rows, len(source))
        if len(source) == 0:
            raise DataError(f"{self.name}: no examples (empty file)")
        if len(chosen) == 0:
            raise DataError(f"data.rows: {rows!r} selects no row of {self.name} ({len(source)} rows)")
        self.n_checked = len(chosen) if check_rows is None else min(len(chosen), check_rows)
        self.long_rows = set()            # over-long rows found so far (at start-up and when drawn)
        long_rows = [r for r in chosen[:self.n_checked] if self.example_of_row(r) is None]
        candidates = np.arange(chosen.start, chosen.stop, chosen.step, dtype=np.int64)
        if long_rows:
            candidates = candidates[~np.isin(candidates, np.asarray(long_rows, dtype=np.int64))]
        self.rows = candidates            # source rows this set draws from
        self.n_long_at_start = len(long_rows)
        if len(self.rows) == 0:
            raise DataError(f"{self.name}: all {self.n_checked} prompts are longer than max_prompt_tokens="
                            f"{max_prompt_tokens}")

    @classmethod
    def open(cls, path: str, tokenizer, fmt: PromptFormat = PromptFormat(), *, key: str = "data", **kwargs):
        """`key` names the format options in errors ("data" for a config, "--" for the command line)."""
        return cls(open_source(path), PromptRenderer(tokenizer, fmt, key=key), name=path, **kwargs)

    # -- rows -> examples ---------------------------------------------------------------------------------------
    def example_of_row(self, row: int):
        """The Example of source row `row`, or None when its prompt is over max_prompt_tokens (on_long_prompt=skip)."""
        where = self.source.where(row)
        record = self.source.row(row)
        parts = extract(record, where, self.fields)
        if self.require_response and parts.response is None:
            raise DataError(f"{where}: missing field 'response' (required here)")
        if self.require_answer and parts.answer is None:
            raise DataError(f"{where}: no 'answer' (nor a \\boxed{{}} answer in a solution or response)")
        prompt_ids = self.renderer.ids(parts.messages, where)
        if len(prompt_ids) > self.max_prompt_tokens:
            if self.on_long_prompt == "error":
                raise DataError(f"{where}: prompt has {len(prompt_ids)} tokens, more than max_prompt_tokens="
                                f"{self.max_prompt_tokens}")
            self.long_rows.add(row)
            return None
        response_ids = None
        if parts.response is not None and self.tokenize_responses:
            response_ids = list(self.renderer.tokenizer.encode(parts.response, add_special_tokens=False)) + self.eos
        return Example(prompt_ids=prompt_ids, response_ids=response_ids, answer=parts.answer, raw=record)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Example:
        """Example k of the set; an over-long row found only now is replaced by a row drawn by a hash of k."""
        if k < 0 or k >= len(self.rows):
            raise IndexError(k)
        ex = self.example_of_row(int(self.rows[k]))
        draw = 0
        while ex is None:
            if draw == MAX_REFILL_DRAWS:
                raise DataError(f"{self.name}: {MAX_REFILL_DRAWS} rows drawn in a row are all longer than "
                                f"max_prompt_tokens={self.max_prompt_tokens}")
            pick = random.Random(f"refill-{k}-{draw}").randrange(len(self.rows))
            ex = self.example_of_row(int(self.rows[pick]))
            draw += 1
        return ex

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def for_step(self, step: int, per_step: int, *, seed: int, shuffle: bool) -> list:
        return [self[k] for k in step_indices(len(self), step, per_step, seed=seed, shuffle=shuffle)]

    @property
    def prompt_ids(self):
        """A sequence view of the prompt ids (what the pipeline draws from)."""
        return _PromptIds(self)

    @property
    def n_long(self) -> int:
        return len(self.long_rows)

    def summary(self) -> str:
        """One line: rows, rows checked, over-long prompts skipped."""
        later = self.n_long - self.n_long_at_start
        checked = ("all checked" if self.n_checked == len(self.rows) + self.n_long_at_start
                   else f"first {self.n_checked:,} checked, the rest when drawn")
        return (f"{self.name}: {len(self.rows) + self.n_long_at_start:,} prompts ({checked}); "
                f"{self.n_long:,} over max_prompt_tokens={self.max_prompt_tokens} skipped"
                + (f" ({later:,} found while drawing)" if later else ""))


class _PromptIds:
    def __init__(self, prompt_set: PromptSet):
        self.prompt_set = prompt_set

    def __len__(self) -> int:
        return len(self.prompt_set)

    def __getitem__(self, k: int) -> list:
        return self.prompt_set[k].prompt_ids


def load_prompts(path: str, *, tokenizer, max_prompt_tokens: int, require_response: bool = False,
                 prompt_template: str = "{prompt}", chat_template: str = "auto", on_long_prompt: str = "error",
                 fields: dict | None = None) -> list:
    """Every example of a small set as a list (eval sets, tests); any bad row is one DataError line."""
    fmt = PromptFormat(chat_template=chat_template, prompt_template=prompt_template)
    ps = PromptSet.open(path, tokenizer, fmt, max_prompt_tokens=max_prompt_tokens, on_long_prompt=on_long_prompt,
                        require_response=require_response, fields=fields, tokenize_responses=True)
    return list(ps)
