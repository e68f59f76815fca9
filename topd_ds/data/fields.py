"""Which field of a row is the prompt, the response and the answer, for the layouts datasets come in.

    prompt     `prompt`, `problem` or `question` (a string, or a list of messages), or a conversation in
               `messages` (OpenAI: role/content) or `conversations` (ShareGPT: from/value, as OpenThoughts3)
    response   `response` or `completion`, else a conversation's final assistant turn, else `solution`
    answer     `answer` (a string or a number), else the last \\boxed{...} of `solution`, else of the response

The first field present wins, in the order listed. `data.fields` maps a role to a column of another name
(`{prompt: instruction, answer: gt}`); a mapped role reads that column only. A conversation's prompt is every
turn up to its last user turn; turns after it are the response. Errors are one line: `<where>: field '<f>' ...`.
"""

from dataclasses import dataclass

from topd_ds.errors import DataError

PROMPT_FIELDS = ("prompt", "problem", "question", "messages", "conversations")
RESPONSE_FIELDS = ("response", "completion")
ROLES = ("prompt", "messages", "response", "solution", "answer")  # the keys data.fields may map

# ShareGPT `from` values -> chat roles (OpenThoughts3 uses human/gpt)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Fields:
    """A row's parts: the prompt as chat messages (ending with a user turn), the response and answer if any."""

    messages: list   # [{"role": "system"|"user"|"assistant", "content": str}, ...], last one "user"
    response: str | None
    answer: str | None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try the one before
    return None


def _present(record: dict, key: str) -> bool:
    return key in record and record[key] is not None


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _conversation(turns, key: str, where: str) -> list:
    """[{"role", "content"}] from OpenAI-style or ShareGPT-style turns."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages, got "
                        f"{type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}")
    out = []
    for k, turn in enumerate(turns):
        at = f"{where}: field '{key}[{k}]'"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be a message object, got {type(turn).__name__}")
        if turn.get("role") is not None:
            role, content, role_key, content_key = turn["role"], turn.get("content"), "role", "content"
            role = role if role in CHAT_ROLES else None
        elif turn.get("from") is not None:
            role, content, role_key, content_key = SHAREGPT_ROLES.get(turn["from"]), turn.get("value"), "from", "value"
        else:
            raise DataError(f"{at} has neither 'role'/'content' (OpenAI) nor 'from'/'value' (ShareGPT)")
        if role is None:
            raise DataError(f"{at}.{role_key} is {turn[role_key]!r}; expected one of "
                            f"{', '.join(CHAT_ROLES if role_key == 'role' else SHAREGPT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}.{content_key} must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _split_conversation(turns: list, key: str, where: str):
    """(prompt turns up to the last user turn, the final assistant turn after it or None)."""
    last_user = max((k for k, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{where}: field '{key}' has no user turn")
    after = [t for t in turns[last_user + 1:] if t["role"] == "assistant"]
    return turns[:last_user + 1], (after[-1]["content"] if after else None)


def _prompt(record: dict, fields: dict, where: str):
    """(messages, response from the conversation or None)."""
    if "prompt" in fields or "messages" in fields:
        key = fields.get("prompt") or fields["messages"]
        if not _present(record, key):
            role = "prompt" if "prompt" in fields else "messages"
            raise DataError(f"{where}: missing field '{key}' (data.fields.{role})")
    else:
        key = next((k for k in PROMPT_FIELDS if _present(record, k)), None)
        if key is None:
            raise DataError(f"{where}: missing field 'prompt' (or problem, question, messages, conversations; "
                            f"data.fields maps other names)")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        return [{"role": "user", "content": value}], None
    if isinstance(value, list):
        messages, response = _split_conversation(_conversation(value, key, where), key, where)
        if not messages[-1]["content"].strip():
            raise DataError(f"{where}: field '{key}' ends with an empty user turn")
        return messages, response
    raise DataError(f"{where}: field '{key}' must be a string or a list of messages, got {type(value).__name__}")


def extract(record: dict, where: str, fields: dict | None = None) -> Fields:
    """The prompt messages, response and answer of one row (see the module docstring)."""
    fields = fields or {}
    messages, response = _prompt(record, fields, where)
    if "response" in fields:
        key = fields["response"]
        response = _string(record, key, where) if _present(record, key) else None
    else:
        key = next((k for k in RESPONSE_FIELDS if _present(record, k)), None)
        if key is not None:
            response = _string(record, key, where)
    solution_key = fields.get("solution", "solution")
    solution = _string(record, solution_key, where) if _present(record, solution_key) else None
    if response is None:
        response = solution
    answer_key = fields.get("answer", "answer")
    answer = None
    if _present(record, answer_key):
        value = record[answer_key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"{where}: field '{answer_key}' must be a string or a number, got {type(value).__name__}")
        answer = value if isinstance(value, str) else _number_text(value)
    else:
        for text in (solution, response):
            if text is not None and (boxed := last_boxed(text)) is not None:
                answer = boxed
                break
    return Fields(messages=messages, response=response, answer=answer)


def _number_text(value) -> str:
    """2025 -> '2025', 0.5 -> '0.5', 3.0 -> '3' (AIME-style sets store integer answers as numbers)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_mapping(fields: dict, key: str = "data.fields"):
    """A ConfigError line for an unknown role or a non-string column name."""
    from topd_ds.errors import ConfigError

    for role, column in fields.items():
        if role not in ROLES:
            raise ConfigError(f"{key}.{role}: unknown role (known: {', '.join(ROLES)})")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{key}.{role}: expected a column name, got {column!r}")
    if "prompt" in fields and "messages" in fields:
        raise ConfigError(f"{key}: map 'prompt' or 'messages', not both (both name the prompt)")

