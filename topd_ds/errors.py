"""The small exception hierarchy of topd-ds.

Each class also subclasses the stdlib error it replaces, so callers that catch ValueError or
RuntimeError keep working. Messages are one line and name the key, file or field at fault.
"""


class TopdError(Exception):
    """Base class of every error topd-ds raises on purpose."""


class ConfigError(TopdError, ValueError):
    """A config key, config file or CLI argument is wrong (message names the key path)."""


class DataError(TopdError, ValueError):
    """A data file (JSONL prompts, responses) is malformed (message names the file and line)."""


class ServerError(TopdError, RuntimeError):
    """An inference server failed, timed out, or kept failing after retries."""


class RequestRejected(ServerError):
    """A server answered that a request is invalid (HTTP 4xx other than 408/409/429), e.g. prompt + max_new_tokens
    past the model's positions: a configuration error, not a server fault. Never retried, never a restart."""


class ProtocolError(ServerError):
    """A server answered, but the answer is malformed (message names the field)."""


class CheckpointError(TopdError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""
