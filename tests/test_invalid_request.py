"""A request the server rejects as invalid is a configuration error, not a server fault (issue 24).

Seen as a new user would: a stage-1 config that left rollout.max_new_tokens at 8000 with a 128-position student
made the built-in student server answer HTTP 400 (`input_ids[0]: 16 + max_new_tokens 8000 > max positions 128`),
and the supervisor restarted it three times (a model reload each) before the run stopped. Now the client raises
RequestRejected at once (no retry) and the supervisor turns it into the run-stopping ServerFailure with the
server's message, without a restart; `topd-ds check` / the trainer's start catch the length beforehand
(tests/test_preflight.py)."""

import asyncio

import pytest

from topd_ds.engines.protocol import SamplingParams
from topd_ds.engines.sglang import SGLangClient, server_message
from topd_ds.engines.supervisor import ServerFailure, Supervisor
from topd_ds.errors import RequestRejected


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, char_tokenizer):
    """A 1-layer Qwen3 student with 128 positions."""
    from topd_ds.tasks.models import build_model, save_model

    model = build_model("qwen3", seed=3, hidden=32, layers=1, heads=4, vocab_size=len(char_tokenizer),
                        pad_id=char_tokenizer.pad_token_id, bos_id=char_tokenizer.bos_token_id,
                        eos_id=char_tokenizer.eos_token_id, max_positions=128)
    return save_model(model, str(tmp_path_factory.mktemp("short") / "student"), char_tokenizer)


def test_a_rejected_request_stops_at_once_without_a_restart(short_model):
    """The built-in server over real HTTP, supervised as the trainer supervises it (max_restarts 3, client
    retries 4): a 16-token prompt with max_new_tokens 8000 is one ServerFailure carrying the server's message,
    sent once, with no restart (the old code restarted the server 3 times, then stopped with "failed 4 times")."""
    from topd_ds.engines.launch import launch_server

    launches, logs = [], []

    def launch(weights, port=None, version=None):
        launches.append(port)
        return launch_server(weights, port=port, weight_version=version)

    sup = Supervisor(None, log=logs.append)
    sup.launched("student", launch_server(short_model), launch=launch, weights=short_model, max_restarts=3)
    pid = sup.servers["student"].proc.proc.pid

    async def run():
        client = SGLangClient(sup.servers["student"].urls, max_retries=4, backoff=0.01)
        guarded = sup.guard(client, "student")
        try:
            with pytest.raises(ServerFailure) as info:
                await sup.retry(lambda: guarded.generate([[5] * 16], SamplingParams(max_new_tokens=8000)))
            # still serving (ignore_eos: the random model may sample EOS before 4 tokens)
            ok = await client.generate([[5] * 16], SamplingParams(max_new_tokens=4, ignore_eos=True))
        finally:
            await client.close()
        return info.value, ok

    try:
        err, ok = asyncio.run(run())
    finally:
        sup.stop_all()
    msg = str(err)
    assert "input_ids[0]: 16 + max_new_tokens 8000 > max positions 128" in msg, msg
    assert "rejected the request as invalid (HTTP 400)" in msg and "not restarted" in msg, msg
    assert isinstance(err.__cause__, RequestRejected)
    assert launches == [] and not any("restart" in line for line in logs), (launches, logs)
    assert sup.servers["student"].proc.proc.pid == pid and len(ok[0][0].output_ids) == 4


def test_a_rejected_request_is_not_retried():
    """One POST for a 400 (the retry whitelist is 408/409/429/5xx); a 429 is still retried."""
    from aiohttp import web

    async def run():
        counts = {"/generate": 0}

        async def handler(request):
            counts["/generate"] += 1
            return web.json_response({"error": {"message": "bad max_new_tokens"}}, status=400)
        app = web.Application()
        app.router.add_post("/generate", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        client = SGLangClient([f"http://127.0.0.1:{port}"], max_retries=4, backoff=0.01)
        try:
            with pytest.raises(RequestRejected, match="HTTP 400.*bad max_new_tokens"):
                await client.generate([[1, 2]], SamplingParams(max_new_tokens=4))
        finally:
            await client.close()
            await runner.cleanup()
        return counts["/generate"]

    assert asyncio.run(run()) == 1


def test_server_message_reads_the_error_bodies():
    assert server_message('{"error": {"message": "too long", "type": "invalid_request_error"}}') == "too long"
    assert server_message('{"error": "unauthorized"}') == "unauthorized"
    assert server_message('{"detail": "Not Found"}') == "Not Found"
    assert server_message("plain\ntext") == "plain text"
