"""The `tensor` weight route's request, decoded the way SGLang 0.5.23 decodes it, by code that is not ours.

The trainer's client (SGLangClient.update_weights_from_tensor with a weight_group.serialize_named_tensors
payload) posts to an in-process fake SGLang that reports tp_size 2 and keeps the body; each tensor-parallel
rank's copy is then decoded in a fresh process by tests/sglang_tensor_decoder.py (SGLang's request fields,
Base64Bytes, MultiprocessingSerializer.deserialize and its SafeUnpickler allow-list, read from the 0.5.23 wheel),
and must give back every tensor bit for bit. The built-in server decodes with our own weight_group helpers, so
a wire format only they accept would pass test_weight_routes.py; it fails here. Seeds fixed.
"""

import asyncio
import json
import os
import pickle
import subprocess
import sys

import torch
from aiohttp import web
from test_engines_client import Fake

HERE = os.path.dirname(os.path.abspath(__file__))


def decode(body, rank, tmp_path):
    """(returncode, stderr, {name: tensor} or None) of the independent decoder in a fresh process."""
    body_file, out = tmp_path / f"body{rank}.json", tmp_path / f"decoded{rank}.pt"
    body_file.write_text(json.dumps(body))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sglang_tensor_decoder.py"), str(body_file),
                           str(rank), str(out)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr, (torch.load(out) if proc.returncode == 0 else None)


def test_tensor_route_body_decodes_as_sglang_decodes_it(tmp_path):
    from topd_ds.engines.sglang import SGLangClient
    from topd_ds.comm.weight_group import serialize_named_tensors

    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g),
             "model.layers.0.mlp.up_proj.weight": torch.randn(24, 8, generator=g).to(torch.bfloat16),
             "model.norm.weight": torch.rand(8, generator=g) + 0.5}

    async def respond(request, body, i):
        if request.path == "/get_server_info":
            return web.json_response({"tp_size": 2, "version": "0.5.23"})
        return web.json_response({"success": True, "message": ""})

    async def main():
        async with Fake(respond) as fake:
            async with SGLangClient(fake.url) as client:
                # the caller keeps the tensors alive until the server answered (and here until decoded)
                await client.update_weights_from_tensor(serialize_named_tensors(list(state.items())), "7")
            return [c for c in fake.calls if c[1] == "/update_weights_from_tensor"]
    calls = asyncio.run(main())
    assert len(calls) == 1, calls
    body = calls[0][2]
    assert len(body["serialized_named_tensors"]) == 2 and body["weight_version"] == "7"
    for rank in (0, 1):
        rc, err, got = decode(body, rank, tmp_path)
        assert rc == 0, err
        assert list(got) == list(state), list(got)
        for name, want in state.items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_the_decoder_blocks_what_sglang_blocks(tmp_path):
    """The allow-list is live: a pickle naming os.system is refused, as SGLang's SafeUnpickler refuses it."""
    import base64

    evil = base64.b64encode(pickle.dumps([("w", os.system)])).decode()
    rc, err, _ = decode({"serialized_named_tensors": [evil], "load_format": None}, 0, tmp_path)
    assert rc == 1 and "Blocked unsafe global" in err and "system" in err, err
