"""An independent decoder of the `tensor` weight route's wire format, as SGLang 0.5.23 reads it (no topd_ds code).

    python tests/sglang_tensor_decoder.py BODY.json TP_RANK OUT.pt

BODY.json is the JSON body of POST /update_weights_from_tensor as sent; the named tensors of rank TP_RANK are
decoded the way SGLang does and written to OUT.pt as {name: tensor (a private copy)}; an error exits 1 with
one line. Run it in a process of its own: torch's file_system sharing caches storages per process, so only a
fresh process opens the shared-memory files the way the server does.

What SGLang 0.5.23 does, read from its wheel (sglang/srt/...):
* managers/io_struct.py:2028-2045 UpdateWeightsFromTensorReqInput: `serialized_named_tensors:
  Annotated[List[bytes], Base64Bytes()]` (HTTP callers send base64 strings, decoded to bytes), `load_format`
  (None: a list of (name, tensor)), `flush_cache`, `abort_all_requests`, `weight_version`, `selector`.
* managers/tp_worker.py:194-201 deserialize_own_rank: each tensor-parallel rank takes index tp_rank only
  and calls MultiprocessingSerializer.deserialize on it.
* utils/common.py:3084-3099 MultiprocessingSerializer.deserialize: bytes (a str is base64-decoded with
  validate=True first) -> SafeUnpickler(io.BytesIO(data)).load().
* utils/common.py:3144-3371 SafeUnpickler: find_class allows exactly ALLOWED_GLOBALS (the CPU entries are
  copied below; CUDA and sparse tensor types left out, as this route sends CPU tensors here) and raises
  RuntimeError("Blocked unsafe global ...") for anything else.
"""

import base64
import binascii
import io
import json
import pickle
import sys

import torch
import torch.multiprocessing  # noqa: F401  (the reductions SGLang's process has registered too)

_DTYPES = ("bfloat16", "bool", "double", "float", "float16", "float32", "float64", "half", "int", "int16",
           "int32", "int64", "int8", "long", "short", "uint8")
_STORAGES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
ALLOWED_GLOBALS = {
    *[("builtins", n) for n in ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int",
                                "list", "range", "set", "slice", "str", "tuple")],
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("copyreg", "__newobj__"),
    ("copyreg", "__newobj_ex__"), ("functools", "partial"), ("multiprocessing.reduction", "_rebuild_partial"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    *[("torch", d) for d in _DTYPES],
    *[("torch", f"{s}Tensor") for s in _STORAGES if s not in ("Bool",)], ("torch", "BoolTensor"),
    ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
    *[("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                    "_rebuild_parameter", "_rebuild_parameter_with_state")],
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "_UntypedStorage"), ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"), *[("torch", f"{s}Storage") for s in _STORAGES],
    *[("torch.multiprocessing.reductions", n) for n in (
        "rebuild_tensor", "rebuild_meta_tensor", "rebuild_storage_fd", "rebuild_storage_filename",
        "rebuild_storage_empty", "rebuild_typed_storage", "rebuild_typed_storage_child")],
}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def decode(body: dict, tp_rank: int) -> list:
    """The request body -> rank tp_rank's [(name, tensor), ..], checked as SGLang's load path needs it."""
    known = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
             "selector"}
    extra = set(body) - known
    if extra:  # SGLang's request struct has no such field
        raise ValueError(f"unknown fields {sorted(extra)}")
    payloads = body["serialized_named_tensors"]
    if not isinstance(payloads, list) or not all(isinstance(p, str) for p in payloads):
        raise ValueError("serialized_named_tensors: expected a list of base64 strings")
    if body.get("load_format") is not None:
        raise ValueError(f"load_format {body['load_format']!r}: only None (a list of (name, tensor)) is decoded here")
    try:
        raw = base64.b64decode(payloads[tp_rank], validate=True)  # Base64Bytes
    except binascii.Error as err:
        raise ValueError(f"serialized_named_tensors[{tp_rank}]: not base64 ({err})") from None
    obj = SafeUnpickler(io.BytesIO(raw)).load()
    if not isinstance(obj, list) or not all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)
                                            and isinstance(e[1], torch.Tensor) for e in obj):
        raise ValueError("expected a list of (name, tensor) tuples (model.load_weights' input)")
    return obj


def main(argv):
    body_file, rank, out = argv
    with open(body_file) as f:
        body = json.load(f)
    try:
        named = decode(body, int(rank))
    except Exception as err:  # noqa: BLE001 - one line for the test
        print(f"decode failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    torch.save({n: t.clone() for n, t in named}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
