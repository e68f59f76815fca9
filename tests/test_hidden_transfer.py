"""Hidden states from the servers as bytes, not JSON numbers; none at all where the estimator needs none.

* the built-in server's base64 encoding (engines/tensor_codec.py) carries the model's own dtype exactly;
* the client asks for it only from servers whose /model_info offers it (SGLang 0.5.x does not);
* with opd.estimator topk the pipeline never asks the teacher for hidden states.
"""

import asyncio
import json

import pytest
import torch
from aiohttp import web

from topd_ds.config import config_from_dict
from topd_ds.engines.hf_engine import HFEngine, Row
from topd_ds.engines.protocol import Completion, Scores
from topd_ds.engines.sglang import SGLangClient
from topd_ds.engines.tensor_codec import decode_tensor, encode_tensor
from topd_ds.errors import ProtocolError
from topd_ds.rollout.pipeline import Pipeline


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_base64_hidden_states_are_the_models_own_values(tiny_models, dtype):
    engine = HFEngine(tiny_models[0], dtype=dtype)
    ids = [1, 5, 9, 4, 7, 3]
    as_json, as_b64 = engine.generate([Row(input_ids=ids, max_new_tokens=1, temperature=0.0,
                                           return_hidden_states=True, hidden_states_encoding=enc)
                                       for enc in ("json", "base64")])
    block = as_b64["meta_info"]["hidden_states"][0]
    got = decode_tensor(block, "hidden")
    with torch.no_grad():
        ref = engine.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert got.dtype == getattr(torch, dtype) and tuple(got.shape) == (len(ids), engine.hidden_size)
    # the same forward as the JSON answer, bit for bit, in the model's dtype (JSON: the same values as floats)
    assert torch.equal(got.float(), torch.tensor(as_json["meta_info"]["hidden_states"][0]))
    assert torch.allclose(got.float(), ref.float(), atol=0.05 if dtype == "bfloat16" else 1e-5)  # a plain forward
    n_json, n_b64 = len(json.dumps(as_json["meta_info"]["hidden_states"])), len(json.dumps(block))
    assert n_b64 < n_json / (3 if dtype == "bfloat16" else 1.5), (n_b64, n_json)


def test_codec_rejects_malformed_objects():
    t = torch.randn(3, 4).bfloat16()
    good = encode_tensor(t)
    assert torch.equal(decode_tensor(good, "x"), t)
    for bad, pattern in [({**good, "dtype": "int8"}, r"x\.dtype"), ({**good, "shape": [3, 5]}, r"x\.data: 24 bytes"),
                         ({**good, "data": "!!"}, r"x\.data: not valid base64"), ({**good, "shape": [3, -4]}, r"x\.shape")]:
        with pytest.raises(ValueError, match=pattern):
            decode_tensor(bad, "x")


def _fake_server(offers: bool, seen: list, H=4, answer=None):
    """A fake teacher: /model_info with or without the encodings list; /generate records its body."""
    async def model_info(request):
        info = {"model_path": "m", "weight_version": "default"}
        if offers:
            info["hidden_states_encodings"] = ["json", "base64"]
        return web.json_response(info)

    async def generate(request):
        body = await request.json()
        seen.append(body)
        seq = body["input_ids"][0]
        hidden = torch.arange(len(seq) * H, dtype=torch.float32).reshape(len(seq), H) / 7
        block = encode_tensor(hidden.bfloat16()) if body.get("hidden_states_encoding") == "base64" \
            else hidden.tolist()
        meta = {"finish_reason": {"type": "length", "length": 1}, "weight_version": "default",
                "output_token_logprobs": [[-0.1, 7, None]],
                "input_token_logprobs": [[None, seq[0], None]] + [[-0.5, t, None] for t in seq[1:]],
                "hidden_states": [block]}
        return web.json_response([{"text": "", "output_ids": [7], "meta_info": meta}])

    app = web.Application()
    app.add_routes([web.get("/model_info", model_info), web.post("/generate", answer or generate)])
    return app


async def _score_with(app, seq, H=4):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with SGLangClient(url, hidden_size=H) as client:
            return (await client.score([seq], start=2, return_hidden=True))[0], client.hidden_encoding
    finally:
        await runner.cleanup()


def test_client_asks_base64_only_from_servers_that_offer_it():
    seq = [1, 2, 3, 4, 5]
    seen_sglang, seen_ours = [], []
    sc_json, enc_json = asyncio.run(_score_with(_fake_server(False, seen_sglang), seq))
    sc_b64, enc_b64 = asyncio.run(_score_with(_fake_server(True, seen_ours), seq))
    assert enc_json == "json" and "hidden_states_encoding" not in seen_sglang[0]    # SGLang: plain JSON request
    assert enc_b64 == "base64" and seen_ours[0]["hidden_states_encoding"] == "base64"
    want = torch.arange(len(seq) * 4, dtype=torch.float32).reshape(len(seq), 4) / 7
    assert torch.equal(torch.as_tensor(sc_json.hidden_states), want)
    assert sc_b64.hidden_states.dtype == torch.bfloat16 and torch.equal(sc_b64.hidden_states, want.bfloat16())


def test_client_names_a_malformed_encoded_block():
    async def generate(request):
        seq = (await request.json())["input_ids"][0]
        block = {**encode_tensor(torch.zeros(len(seq), 4)), "shape": [len(seq), 5]}
        meta = {"finish_reason": {"type": "length", "length": 1}, "output_token_logprobs": [[-0.1, 7, None]],
                "input_token_logprobs": [[None, seq[0], None]] + [[-0.5, t, None] for t in seq[1:]],
                "hidden_states": [block]}
        return web.json_response([{"text": "", "output_ids": [7], "meta_info": meta}])
    app = _fake_server(True, [], answer=generate)
    with pytest.raises(ProtocolError, match=r"answer\[0\]\.meta_info\.hidden_states\[0\]\.data"):
        asyncio.run(_score_with(app, [1, 2, 3, 4]))


class RecordingClient:
    """An in-process InferenceClient: fixed rollouts, top-k scores, and a record of every score call."""

    def __init__(self, V=20, k=3):
        self.V, self.k, self.score_calls = V, k, []

    async def generate(self, prompts, params, *, n=1, seeds=None):
        return [[Completion(output_ids=[3 + j, 4, 5], logprobs=[-1.0] * 3, finish_reason="length")
                 for j in range(n)] for _ in prompts]

    async def score(self, sequences, *, start, top_k=0, return_hidden=False):
        self.score_calls.append({"top_k": top_k, "return_hidden": return_hidden})
        out = []
        for seq, s in zip(sequences, start):
            n = len(seq) - s
            out.append(Scores(token_logprobs=[-0.5] * n, topk_ids=[list(range(top_k))] * n,
                              topk_logprobs=[[-1.0 - i for i in range(top_k)]] * n,
                              hidden_states=torch.zeros(len(seq), 8) if return_hidden else None))
        return out

    async def close(self):
        pass


def test_topk_estimator_never_requests_hidden_states():
    cfg = config_from_dict({
        "model": {"student": "s", "teacher": "t"}, "data": {"prompts": "p"},
        "rollout": {"n_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 3},
        "opd": {"estimator": "topk", "top_k": 4}, "topd": {"mode": "opd"}, "pipeline": {"max_staleness": 0},
        "train": {"global_batch_size": 4, "micro_batch_size": 4}}, check_paths=False)
    student, teacher = RecordingClient(), RecordingClient()

    async def clients():
        return student, teacher

    pipe = Pipeline(prompts=[[1, 2], [1, 6, 7]], make_clients=clients, teacher_head=torch.zeros(20, 8),
                    embedding=torch.zeros(20, 8), cfg=cfg, start_step=0, eos_id=2, pad_id=0, weight_version=0,
                    produce=False)
    try:
        batch = pipe.call(pipe.build(0, 0))
    finally:
        pipe.close()
    assert teacher.score_calls == [{"top_k": 4, "return_hidden": False}]
    assert all(not c["return_hidden"] for c in student.score_calls)
    assert batch.teacher_hidden is None and len(batch.teacher_topk_ids) == 4
