"""Prompt sets: the one JSONL loader shared by the built-in arith task and real data, and batch padding.

A data file has one JSON object per line: {"prompt": str} (or {"problem": str}, as math benchmark sets
name it) with optional {"response": str} and {"answer": str}. Blank lines are skipped. Every problem
is reported as one DataError line naming `file:line` and the field, before any model is loaded.

Token layout (chat-free for arith; `prompt_template` wraps the text for real chat models):

    prompt_ids   = [<bos>] + tokens(prompt_template.format(prompt=prompt))
    response_ids = tokens(response) + [<eos>]
"""

import json
from dataclasses import dataclass

from topd_ds.errors import DataError


@dataclass(frozen=True)
class Example:
    """One loaded example: token ids of the prompt (and response), the answer if given, the raw record."""

    prompt_ids: list
    response_ids: list | None
    answer: str | None
    raw: dict


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_prompts(path: str, *, tokenizer, max_prompt_tokens: int, require_response: bool = False,
                 prompt_template: str = "{prompt}") -> list:
    """Read a JSONL prompt file into Examples; raise DataError (`file:line: ...`) on the first bad line.

    Checks: UTF-8, valid JSON object, "prompt" present, a non-empty string, within `max_prompt_tokens`
    (counting <bos>); "response"/"answer" strings if present; "response" present if `require_response`;
    the file holds at least one example.
    """
    if "{prompt}" not in prompt_template:
        raise DataError(f"prompt_template: must contain '{{prompt}}', got {prompt_template!r}")
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from err
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from err
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "prompt" not in record and isinstance(record.get("problem"), str):
            record = {**record, "prompt": record["problem"]}  # AIME/HMMT-style {"problem", "answer"} sets
        if "prompt" not in record:
            raise DataError(f"{where}: missing field 'prompt'")
        for key in ("prompt", "response", "answer"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
        if not record["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        if require_response and "response" not in record:
            raise DataError(f"{where}: missing field 'response' (required here)")
        prompt_ids = bos + _encode(tokenizer, prompt_template.format(prompt=record["prompt"]))
        if len(prompt_ids) > max_prompt_tokens:
            raise DataError(f"{where}: prompt has {len(prompt_ids)} tokens, more than max_prompt_tokens="
                            f"{max_prompt_tokens}")
        response_ids = _encode(tokenizer, record["response"]) + eos if "response" in record else None
        examples.append(Example(prompt_ids=prompt_ids, response_ids=response_ids,
                                answer=record.get("answer"), raw=record))
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


def pad_batch(seqs, pad_id: int, *, side: str = "right"):
    """Pad ragged id lists into (ids, mask), both LongTensor of shape (B, T_max); mask is 1 on real tokens.

    side="left" for generation (every prompt ends at the last column), "right" for training.
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side: must be 'left' or 'right', got {side!r}")
    seqs = [list(s) for s in seqs]
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    t_max = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t_max), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), t_max), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(t_max - len(s), t_max) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
