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


class ProtocolError(ServerError):
    """A server answered, but the answer is malformed (message names the field)."""


class CheckpointError(TopdError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""
