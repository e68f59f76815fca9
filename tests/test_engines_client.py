"""SGLangClient against fake servers: retries, backoff, Retry-After, timeouts, a server killed
mid-request, malformed answers, API key, flush/update fan-out, load spreading."""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from topd_ds.engines.launch import free_port, wait_healthy
from topd_ds.engines.protocol import SamplingParams
from topd_ds.engines.sglang import SGLangClient, backoff_delay, is_retryable
from topd_ds.errors import ProtocolError, ServerError

FAST = dict(backoff=0.001, timeout_s=5.0, connect_timeout_s=1.0)


def item(ids=(5, 6), lps=(-1.0, -2.0), finish=None, **meta):
    """One well-formed SGLang /generate answer item."""
    info = {"finish_reason": finish or {"type": "length", "length": len(ids)}, "prompt_tokens": 2,
            "completion_tokens": len(ids), "weight_version": "default",
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)], **meta}
    return {"text": "", "output_ids": list(ids), "meta_info": info}


class Fake:
    """An in-process aiohttp server; `respond(request, body, call_index)` makes each answer."""

    def __init__(self, respond):
        self.respond, self.calls = respond, []

    async def _handle(self, request):
        body = await request.read()
        self.calls.append((request.method, request.path, json.loads(body) if body else None, dict(request.headers)))
        return await self.respond(request, self.calls[-1][2], len(self.calls) - 1)

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)  # hung handlers end with the client
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def ok(payload, status=200, headers=None):
    async def respond(request, body, i):
        return web.Response(text=json.dumps(payload), status=status, headers=headers,
                            content_type="application/json")
    return respond


def run(coro):
    return asyncio.run(coro)


PARAMS = SamplingParams(max_new_tokens=2)


# ---- retry policy ---------------------------------------------------------------------------------
def test_retry_policy_pure():
    assert all(is_retryable(s) for s in (None, 408, 409, 429, 500, 502, 503, 599))
    assert not any(is_retryable(s) for s in (400, 401, 403, 404, 422))
    assert backoff_delay(3, base_s=1.0, retry_after="2.5") == 2.5
    delays = [backoff_delay(3, base_s=0.1) for _ in range(200)]
    assert 0 <= min(delays) and max(delays) <= 0.8 and len(set(delays)) > 100   # full jitter in [0, 0.1 * 2^3]


def test_503_then_success_retries_with_backoff():
    async def respond(request, body, i):
        if i < 2:
            return web.Response(status=503, text="busy")
        return web.json_response([item()])

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, **FAST) as client:
            out = await client.generate([[1, 2]], PARAMS)
            return fake, out
    fake, out = run(main())
    assert len(fake.calls) == 3
    assert out[0][0].output_ids == [5, 6] and out[0][0].logprobs == [-1.0, -2.0]
    assert out[0][0].finish_reason == "length"


def test_retry_after_is_honoured():
    async def respond(request, body, i):
        if i == 0:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "0.4"})
        return web.json_response([item()])

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, **FAST) as client:
            t0 = time.monotonic()
            await client.generate([[1, 2]], PARAMS)
            return time.monotonic() - t0, fake
    elapsed, fake = run(main())
    assert len(fake.calls) == 2 and elapsed >= 0.4


def test_gives_up_after_max_retries_and_4xx_is_not_retried():
    async def main():
        async with Fake(ok({"error": "boom"}, status=500)) as f500, Fake(ok({"error": "bad"}, status=400)) as f400:
            async with SGLangClient(f500.url, max_retries=2, **FAST) as client:
                with pytest.raises(ServerError, match="failed after 3 tries.*HTTP 500"):
                    await client.generate([[1]], PARAMS)
            async with SGLangClient(f400.url, max_retries=2, **FAST) as client:
                with pytest.raises(ServerError, match="HTTP 400") as info:
                    await client.generate([[1]], PARAMS)
                assert not isinstance(info.value, ProtocolError)
            return len(f500.calls), len(f400.calls)
    assert run(main()) == (3, 1)


def test_hanging_server_is_given_up_on_within_two_timeouts():
    """A hung server: max_retries=4 used to mean 5 x timeout_s (25 minutes at the defaults) before anything
    was said, as 'TimeoutError: ' with no text. Now the second timeout in a row ends the call (<= ~2 x
    timeout_s), in one line naming the url, the call and the limit."""
    answered = []  # the fake's answers sent: the client must give up before the first (event order, no clock)

    async def respond(request, body, i):
        await asyncio.sleep(10)
        answered.append(i)
        return web.json_response([item()])

    async def main():
        async with Fake(respond) as fake:
            async with SGLangClient(fake.url, max_retries=4, backoff=0.001, timeout_s=0.3) as client:
                with pytest.raises(ServerError) as info:
                    await client.generate([[1]], PARAMS)
                return list(answered), info.value, len(fake.calls), fake.url
    sent, err, calls, url = run(main())
    assert calls == 2 and sent == [], (calls, sent)
    assert str(err) == (f"POST {url}/generate: no answer within 0.3 s (timeout_s), 2 time(s) in a row: "
                        f"the server is hung or overloaded"), str(err)
    assert "\n" not in str(err) and isinstance(err.__cause__, asyncio.TimeoutError)


def test_connection_refused_raises_from_cause_and_fails_over():
    dead = f"http://127.0.0.1:{free_port()}"

    async def main():
        async with SGLangClient(dead, max_retries=2, **FAST) as client:
            with pytest.raises(ServerError, match="failed after 3 tries") as info:
                await client.generate([[1]], PARAMS)
            assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)
        async with Fake(ok([item()])) as good, SGLangClient([dead, good.url], max_retries=3, **FAST) as client:
            outs = [await client.generate([[1]], PARAMS) for _ in range(4)]
            assert all(o[0][0].output_ids == [5, 6] for o in outs)
            assert not await client.health()          # one url is down
    run(main())


HANGING_SERVER = """
import asyncio, sys
from aiohttp import web
async def hang(request):
    await asyncio.sleep(60)
    return web.json_response([])
async def health(request):
    return web.Response(text="")
app = web.Application()
app.add_routes([web.post("/generate", hang), web.get("/health", health)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def test_server_killed_mid_request():
    """A server SIGKILLed while answering: the client retries on the other url, or raises ServerError."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SERVER, str(port)], start_new_session=True)
    doomed = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(doomed, timeout_s=30, proc=proc)

        async def main():
            async with Fake(ok([item()])) as good:
                async with SGLangClient([doomed], max_retries=1, **FAST) as solo, \
                        SGLangClient([doomed, good.url], max_retries=2, **FAST) as pair:
                    pair.load[good.url] = 1           # make the first pick the doomed server
                    solo_task = asyncio.ensure_future(solo.generate([[1]], PARAMS))
                    pair_task = asyncio.ensure_future(pair.generate([[1]], PARAMS))
                    await asyncio.sleep(0.5)
                    assert len(good.calls) == 0 and not solo_task.done()
                    os.killpg(proc.pid, signal.SIGKILL)
                    pair.load[good.url] = 0
                    out = await asyncio.wait_for(pair_task, 10)
                    with pytest.raises(ServerError) as info:
                        await asyncio.wait_for(solo_task, 10)
                    return out, info.value, len(good.calls)
        out, err, good_calls = run(main())
        assert out[0][0].output_ids == [5, 6] and good_calls == 1
        assert isinstance(err.__cause__, aiohttp.ClientError)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ---- malformed answers ----------------------------------------------------------------------------
MALFORMED = {
    "output_ids": ([{"text": "", "meta_info": item()["meta_info"]}], r"answer\[0\]\.output_ids: missing"),
    "short": ([item(ids=(5, 6, 7), lps=(-1.0, -2.0, -3.0)) | {"output_ids": [5, 6, 7, 8]}],
              r"output_token_logprobs: expected 4 entries, got 3"),
    "nan": ([item(lps=(-1.0, math.nan))], r"output_token_logprobs\[1\]\[0\]: expected a finite logprob"),
    "inf": ([item(lps=(-math.inf, -1.0))], r"output_token_logprobs\[0\]\[0\]: expected a finite logprob"),
    "positive": ([item(lps=(-1.0, 0.5))], r"output_token_logprobs\[1\]\[0\]"),
    "id mismatch": ([item() | {"output_ids": [5, 9]}], r"output_token_logprobs\[1\]: token id 6 != expected 9"),
    "finish": ([item(finish={"type": "weird"})], r"finish_reason: expected type"),
    "count": ([item(), item()], r"answer: expected 1 entries, got 2"),
    "not a list": ("oops", r"answer: expected a list, got str"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_generate_answers_raise_protocol_error(case):
    payload, pattern = MALFORMED[case]

    async def main():
        async with Fake(ok(payload)) as fake, SGLangClient(fake.url, **FAST) as client:
            with pytest.raises(ProtocolError, match=pattern):
                await client.generate([[1, 2]], PARAMS)
            return len(fake.calls)
    assert run(main()) == 1                           # malformed answers are not retried


def test_garbage_body_raises_protocol_error():
    async def respond(request, body, i):
        return web.Response(text="{<html>oops", content_type="application/json")

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, **FAST) as client:
            with pytest.raises(ProtocolError, match="not valid JSON"):
                await client.generate([[1]], PARAMS)
    run(main())


def score_item(seq, sent, H=4, rows=None, k=0, lp=-0.5):
    meta = {"input_token_logprobs": [[None, seq[sent], None]] + [[lp, t, None] for t in seq[sent + 1:]],
            "hidden_states": [[[0.1] * H for _ in range(rows if rows is not None else len(seq))]]}
    if k:
        meta["input_top_logprobs"] = [None] + [[[-0.1, 3, None]] * k for _ in seq[sent + 1:]]
    return item(ids=(7,), lps=(-0.1,), **meta)


@pytest.mark.parametrize("case,answer,pattern", [
    ("width", score_item([1, 2, 3, 4], 0, H=5), r"hidden_states\[0\]: hidden width 5 != expected 4"),
    ("rows", score_item([1, 2, 3, 4], 0, rows=5), r"hidden_states\[0\]: expected shape \(1..4, H\)"),
    ("no rows", score_item([1, 2, 3, 4], 0, rows=0), r"hidden_states\[0\]: expected shape \(1..4, H\)"),
    ("short input", item(input_token_logprobs=[[None, 1, None], [-1.0, 2, None]], hidden_states=[[[0.0] * 4] * 4]),
     r"input_token_logprobs: expected 4 entries, got 2"),
])
def test_malformed_score_answers(case, answer, pattern):
    async def main():
        async with Fake(ok([answer])) as fake, SGLangClient(fake.url, hidden_size=4, **FAST) as client:
            with pytest.raises(ProtocolError, match=pattern):
                await client.score([[1, 2, 3, 4]], start=2, return_hidden=True)
    run(main())


def test_hidden_rows_assembled_from_chunked_tails():
    """A server that chunks prefill into 3-token pieces and reuses cached prefixes (as SGLang) returns only
    the rows of each request's last chunk; the client asks for the missing head until all L rows are there,
    in order, and each follow-up starts one chunk before its end (the cached prefix is reused)."""
    seqs = [list(range(1, 12)), list(range(20, 25))]
    chunk = 3

    async def respond(request, body, i):
        if request.path == "/get_server_info":
            return web.json_response({"chunked_prefill_size": chunk})
        if request.path != "/generate":
            return web.json_response({}, status=404)
        ids = body["input_ids"] if isinstance(body["input_ids"][0], list) else [body["input_ids"]]
        starts = body["logprob_start_len"] if isinstance(body["logprob_start_len"], list) else [body["logprob_start_len"]]
        out = []
        for seq, s in zip(ids, starts):
            first = max(s, len(seq) - chunk)            # the last chunk of the recomputed part [s, L)
            rows = [[float(seq[p])] * 4 for p in range(first, len(seq))]
            out.append(item(ids=(7,), lps=(-0.1,), hidden_states=[rows],
                            input_token_logprobs=[[None, seq[s], None]] + [[-0.5, t, None] for t in seq[s + 1:]]))
        return web.json_response(out if isinstance(body["input_ids"][0], list) else out[0])

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, hidden_size=4, **FAST) as client:
            scores = await client.score(seqs, start=2, return_hidden=True)
            return scores, [c for c in fake.calls if c[1] == "/generate"]
    scores, calls = run(main())
    for seq, sc in zip(seqs, scores):
        assert np.asarray(sc.hidden_states)[:, 0].tolist() == [float(t) for t in seq]
    follow = [(len(c[2]["input_ids"]), c[2]["logprob_start_len"]) for c in calls[1:]]
    assert sorted(follow) == sorted([(8, 5), (5, 2), (2, 0), (2, 0)]), follow


def test_score_request_layout_and_slicing():
    """start s is sent as logprob_start_len s - 1 and the leading null entry is dropped."""
    seq = [1, 2, 3, 4, 5]

    async def respond(request, body, i):
        sent = body["logprob_start_len"][0]
        meta = {"input_token_logprobs": [[None, seq[sent], None]] +
                [[-float(p), seq[p], None] for p in range(sent + 1, len(seq))],
                "input_top_logprobs": [None] + [[[-0.01 * p, p, None]] * 2 for p in range(sent + 1, len(seq))]}
        return web.json_response([item(ids=(7,), lps=(-0.1,), **meta)])

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, **FAST) as client:
            sc = (await client.score([seq], start=3, top_k=2))[0]
            return sc, fake.calls[0][2]
    sc, sent = run(main())
    assert sent["logprob_start_len"] == [2] and sent["top_logprobs_num"] == 2 and sent["return_logprob"] is True
    assert sc.token_logprobs == [-3.0, -4.0]                # positions 3 and 4
    assert sc.topk_ids == [[3, 3], [4, 4]]
    with pytest.raises(ValueError, match=r"start\[0\]"):
        run(SGLangClient("http://127.0.0.1:1").score([seq], start=0))


# ---- auth, fan-out, flush, versions, load ------------------------------------------------------------
def test_api_key_header_is_sent():
    async def respond(request, body, i):
        if request.headers.get("Authorization") != "Bearer s3cret":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response([item()])

    async def main():
        async with Fake(respond) as fake:
            async with SGLangClient(fake.url, api_key="s3cret", **FAST) as client:
                await client.generate([[1]], PARAMS)
            async with SGLangClient(fake.url, **FAST) as client:
                with pytest.raises(ServerError, match="HTTP 401"):
                    await client.generate([[1]], PARAMS)
    run(main())


def test_update_weights_goes_to_every_url_and_failures_name_the_url():
    async def good(request, body, i):
        return web.json_response({"success": True, "message": "ok", "num_paused_requests": 0})

    async def bad(request, body, i):
        return web.json_response({"success": False, "message": "no such dir"}, status=400)

    async def main():
        async with Fake(good) as a, Fake(good) as b, Fake(bad) as c:
            async with SGLangClient([a.url, b.url], **FAST) as client:
                await client.update_weights("/ckpt/step-3", "step-3")
            async with SGLangClient([a.url, c.url], **FAST) as client:
                with pytest.raises(ServerError, match=f"{c.url}/update_weights_from_disk: failed.*no such dir"):
                    await client.update_weights("/ckpt/x", "x")
            return a.calls, b.calls
    a_calls, b_calls = run(main())
    for calls in (a_calls[:1], b_calls):
        assert calls == [("POST", "/update_weights_from_disk", {"model_path": "/ckpt/step-3", "weight_version": "step-3"},
                          calls[0][3])]


def test_flush_cache_is_retried_while_requests_are_pending():
    async def respond(request, body, i):
        return web.Response(status=400 if i < 3 else 200, text="pending" if i < 3 else "Cache flushed.")

    async def main():
        async with Fake(respond) as fake, SGLangClient(fake.url, **FAST) as client:
            await client.flush_cache()
            return len(fake.calls)
    assert run(main()) == 4

    async def never(request, body, i):
        return web.Response(status=400, text="pending")

    async def main2():
        async with Fake(never) as fake, SGLangClient(fake.url, flush_timeout_s=0.3, **FAST) as client:
            with pytest.raises(ServerError, match="flush_cache: still refused"):
                await client.flush_cache()
    run(main2())


def test_weight_version_fallback_and_disagreement():
    async def info_only(request, body, i):
        if request.path == "/get_weight_version":
            return web.Response(status=404, text="not found")
        return web.json_response({"model_path": "m", "weight_version": "v3"})

    async def main():
        async with Fake(info_only) as a, Fake(ok({"weight_version": "v3"})) as b, Fake(ok({"weight_version": "v4"})) as c:
            async with SGLangClient([a.url, b.url], **FAST) as client:
                assert await client.weight_version() == "v3"
            async with SGLangClient([b.url, c.url], **FAST) as client:
                with pytest.raises(ServerError, match="servers disagree"):
                    await client.weight_version()
    run(main())


def test_requests_spread_by_load_and_concurrency_is_bounded():
    state = {"now": 0, "peak": 0}

    async def slow(request, body, i):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.1)
        state["now"] -= 1
        return web.json_response([item() for _ in body["input_ids"]])

    async def main():
        async with Fake(slow) as a, Fake(slow) as b:
            async with SGLangClient([a.url, b.url], max_concurrency=3, prompts_per_request=1, **FAST) as client:
                out = await client.generate([[1, i] for i in range(12)], PARAMS)
            return out, len(a.calls), len(b.calls)
    out, na, nb = run(main())
    assert len(out) == 12 and na + nb == 12 and min(na, nb) >= 5
    assert state["peak"] <= 3


def test_missing_flags_read_from_get_server_info():
    """SGLang's /get_server_info names its launch flags: a teacher without --enable-return-hidden-states (or a
    student without --enable-deterministic-inference) is named with the flag; a server without that endpoint
    (the built-in one, 404) needs none."""
    async def respond(request, body, i):
        if request.path == "/get_server_info" and sglang_port and request.url.port == sglang_port[0]:
            return web.json_response({"enable_return_hidden_states": False, "enable_deterministic_inference": True,
                                      "chunked_prefill_size": 8192})
        return web.json_response({"error": "not found"}, status=404)

    async def main():
        async with Fake(respond) as a, Fake(respond) as b:
            sglang_port.append(int(a.url.rsplit(":", 1)[1]))
            async with SGLangClient([a.url, b.url], **FAST) as client:
                return a.url, await client.missing_flags(hidden_states=True, deterministic=True)
    sglang_port = []
    url, missing = run(main())
    assert missing == [f"{url}: --enable-return-hidden-states (teacher.scoring: server scores with teacher hidden states)"]


def test_flat_top_logprobs_parsed_and_malformed_ones_named():
    """SGLang 0.5.23's flat base64 top-k (return_flat_raw_top_logprobs_b64) -> the rows from `skip` on; a wrong
    shape, byte count, dtype or value raises ProtocolError naming the field."""
    import base64

    from topd_ds.engines.sglang import parse_flat_top_logprobs

    rng = np.random.default_rng(7)
    rows, k = 5, 3
    vals = -np.sort(rng.random((rows, k)).astype(np.float32), axis=1)
    ids = rng.integers(0, 1000, (rows, k)).astype(np.int32)
    meta = {"input_top_logprobs_val_flat_b64": base64.b64encode(vals.tobytes()).decode(),
            "input_top_logprobs_idx_flat_b64": base64.b64encode(ids.tobytes()).decode(),
            "input_top_logprobs_val_flat_b64_dtype": "float32", "input_top_logprobs_idx_flat_b64_dtype": "int32",
            "input_top_logprobs_shape": [rows, k], "input_top_logprobs_null_prefix": 1}
    got_ids, got_vals = parse_flat_top_logprobs(meta, rows + 1, k, 2, "a")
    assert np.array_equal(got_ids, ids[1:]) and np.array_equal(got_vals, vals[1:])
    plain = {**{key: v for key, v in meta.items() if "b64" not in key},
             "input_top_logprobs_val_flat": vals.reshape(-1).tolist(), "input_top_logprobs_idx_flat": ids.reshape(-1).tolist()}
    assert np.array_equal(parse_flat_top_logprobs(plain, rows + 1, k, 1, "a")[0], ids)
    bad = [({"input_top_logprobs_shape": [rows, k + 1]}, "input_top_logprobs_shape"),
           ({"input_top_logprobs_null_prefix": 0}, "input_top_logprobs_shape"),
           ({"input_top_logprobs_val_flat_b64_dtype": "bf16"}, "val_flat_b64_dtype"),
           ({"input_top_logprobs_idx_flat_b64": base64.b64encode(ids[:2].tobytes()).decode()}, "idx_flat_b64: "),
           ({"input_top_logprobs_val_flat_b64": base64.b64encode((-vals).tobytes()).decode()}, "finite logprobs"),
           ({"input_top_logprobs_val_flat_b64": "%%"}, "not valid base64")]
    for change, words in bad:
        with pytest.raises(ProtocolError, match=words):
            parse_flat_top_logprobs({**meta, **change}, rows + 1, k, 1, "a")
