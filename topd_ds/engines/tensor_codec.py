"""Tensors inside a JSON answer without the float-to-text blow-up: base64 of the raw little-endian bytes.

    {"encoding": "base64", "dtype": "bfloat16", "shape": [L, H], "data": "<base64>"}

A float as JSON text costs ~10-20 bytes (and a parse); as raw bf16 it is 2 bytes, 2.7 in base64. The
built-in server answers hidden states this way when a request asks `"hidden_states_encoding": "base64"`
and says so in /model_info (`"hidden_states_encodings": ["json", "base64"]`), so the client only asks
servers that offer it. SGLang 0.5.x offers no such encoding: its scheduler turns hidden states into
Python lists (`.cpu().clone().tolist()` in managers/scheduler_output_processor_mixin.py) and the HTTP
layer writes them as JSON numbers (docs/ENGINES.md).
"""

from __future__ import annotations

import base64
import binascii
import math
import sys

import torch

ENCODING = "base64"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

if sys.byteorder != "little":  # the wire is little-endian; torch.frombuffer reads native order
    raise ImportError("tensor_codec: a big-endian host would misread the little-endian wire format")


def encode_tensor(t: torch.Tensor) -> dict:
    """A float tensor -> the JSON object above; the dtype is kept (no rounding, no upcast)."""
    name = next((k for k, v in DTYPES.items() if v == t.dtype), None)
    if name is None:
        raise ValueError(f"encode_tensor: dtype {t.dtype} not one of {sorted(DTYPES)}")
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"encoding": ENCODING, "dtype": name, "shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}


def is_encoded(obj) -> bool:
    return isinstance(obj, dict) and obj.get("encoding") == ENCODING


def decode_tensor(obj, where: str) -> torch.Tensor:
    """The JSON object above -> a CPU tensor of its dtype; ValueError naming `where` if malformed."""
    if not is_encoded(obj):
        raise ValueError(f"{where}: expected an object with encoding {ENCODING!r}")
    dtype = DTYPES.get(obj.get("dtype"))
    if dtype is None:
        raise ValueError(f"{where}.dtype: expected one of {sorted(DTYPES)}, got {obj.get('dtype')!r}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{where}.shape: expected a list of sizes, got {shape!r}")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (binascii.Error, TypeError) as err:
        raise ValueError(f"{where}.data: not valid base64 ({err})") from err
    size = torch.empty((), dtype=dtype).element_size()
    if len(raw) != math.prod(shape) * size:
        raise ValueError(f"{where}.data: {len(raw)} bytes for shape {shape} in {obj['dtype']} "
                         f"(expected {math.prod(shape) * size})")
    if not raw:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
