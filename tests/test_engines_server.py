"""The built-in server's pieces in-process: sampling math, padded batches, seeds, request batching,
request validation and the API key (the HTTP conformance run is tests/test_engines_conformance.py)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import torch
from aiohttp import web

from topd_ds.engines.hf_engine import HFEngine, Row, sample_next
from topd_ds.engines.server import BadRequest, Server, parse_generate


@pytest.fixture(scope="module")
def engine(tiny_models):
    return HFEngine(tiny_models[0], max_batch=16)


def reference_sample(logits, temperature, top_k, top_p, u):
    """float64 brute force of one row: scaled softmax, top-k, nucleus, renormalise, invert the CDF."""
    V = logits.numel()
    t = 1.0 if temperature <= 0 else temperature
    k = 1 if temperature <= 0 else (V if top_k < 0 else top_k)
    probs = torch.softmax(logits.double() / t, -1)
    order = sorted(range(V), key=lambda i: -probs[i].item())
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if rank >= k or (rank > 0 and mass >= top_p):
            break
        kept.append(i)
        mass += probs[i].item()
    total = sum(probs[i].item() for i in kept)
    acc = 0.0
    for i in kept:
        acc += probs[i].item() / total
        if u <= acc:
            return i
    return kept[-1]


def test_sample_next_matches_float64_reference():
    g = torch.Generator().manual_seed(123)
    B, V = 64, 20
    logits = 3 * torch.randn(B, V, generator=g)
    temperature = torch.rand(B, generator=g) * 2
    temperature[::7] = 0.0                                              # some greedy rows
    top_k = torch.randint(-1, V + 1, (B,), generator=g)
    top_k[top_k == 0] = -1
    top_p = torch.rand(B, generator=g) * 0.9 + 0.1
    top_p[::5] = 1.0
    u = torch.rand(B, generator=g) * 0.98 + 0.01
    tok, logprobs = sample_next(logits, temperature, top_k, top_p, u)
    for b in range(B):
        want = reference_sample(logits[b], temperature[b].item(), top_k[b].item(), top_p[b].item(), u[b].item())
        assert tok[b].item() == want, f"row {b}"
        t = temperature[b].item() if temperature[b] > 0 else 1.0
        assert torch.allclose(logprobs[b].double(), torch.log_softmax(logits[b].double() / t, -1), atol=1e-5)


def test_padded_batch_equals_unpadded_forward(engine):
    g = torch.Generator().manual_seed(7)
    rows = [Row(input_ids=torch.randint(3, engine.vocab_size, (n,), generator=g).tolist(), max_new_tokens=4,
                temperature=0.0, ignore_eos=True, return_logprob=True, logprob_start_len=0)
            for n in (2, 11, 5, 8)]
    batched = engine.generate(rows)
    for r, ans in zip(rows, batched):
        alone = engine.generate([r])[0]
        assert ans["output_ids"] == alone["output_ids"]
        seq = r.input_ids + ans["output_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(engine.model(torch.tensor([seq])).logits[0].double(), -1)
        got = [e[0] for e in ans["meta_info"]["input_token_logprobs"][1:]] + \
              [e[0] for e in ans["meta_info"]["output_token_logprobs"]]
        solo = [e[0] for e in alone["meta_info"]["input_token_logprobs"][1:]] + \
               [e[0] for e in alone["meta_info"]["output_token_logprobs"]]
        want = [ref[t - 1, seq[t]].item() for t in range(1, len(seq))]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
        assert max(abs(a - b) for a, b in zip(got, solo)) < 1e-5


def test_seeds_reproduce_and_differ(engine):
    def run(seed):
        return engine.generate([Row(input_ids=[1, 5, 6], max_new_tokens=12, ignore_eos=True, seed=seed)])[0]["output_ids"]
    assert run(42) == run(42)
    assert len({tuple(run(s)) for s in range(5)}) > 1


@pytest.mark.parametrize("body,field", [
    ({"text": "1+1="}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [[1, 2], "x"]}, r"input_ids\[1\]"),
    ({"input_ids": [1, 99]}, r"input_ids\[0\]"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
    ({"input_ids": [1], "sampling_params": {"n": 0}}, r"sampling_params\.n"),
    ({"input_ids": [1], "sampling_params": {"stop": ["x"]}}, r"sampling_params\.stop"),
    ({"input_ids": [1, 2], "logprob_start_len": 2}, "logprob_start_len"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params: expected 2"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1000}}, "max positions"),
])
def test_parse_generate_names_the_bad_field(body, field):
    with pytest.raises(BadRequest, match=field):
        parse_generate(body, vocab_size=20, max_positions=256)


def test_parse_generate_expands_n_prompt_major():
    rows, single = parse_generate({"input_ids": [[1, 2], [3]], "sampling_params": {"n": 3, "sampling_seed": 5}},
                                  vocab_size=20, max_positions=256)
    assert not single and [r.input_ids for r in rows] == [[1, 2]] * 3 + [[3]] * 3
    assert [r.seed for r in rows] == [5, 6, 7, 5, 6, 7]
    assert parse_generate({"input_ids": [4]}, vocab_size=20, max_positions=256)[1] is True


class CountingEngine:
    """Wraps an engine and records the number of rows of every forward batch."""

    def __init__(self, engine):
        self.inner, self.batches = engine, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, rows):
        self.batches.append(len(rows))
        return self.inner.generate(rows)


async def serve_in_process(server):
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def test_concurrent_requests_share_one_batch_and_api_key(engine, monkeypatch):
    import topd_ds.engines.server as server_module

    counting = CountingEngine(engine)
    # max_batch 6 and collection bounds longer than any gap: the batch closes when the sixth request arrives (an
    # event), not when a 200 ms quiet window or MAX_COLLECT_S passes (a loaded machine could split the batch)
    monkeypatch.setattr(server_module, "MAX_COLLECT_S", 60.0)
    server = Server(counting, api_key="k3y", max_batch=6, batch_window_ms=60_000)
    auth = {"Authorization": "Bearer k3y"}

    async def main():
        runner, url = await serve_in_process(server)
        try:
            async with aiohttp.ClientSession() as s:
                async def gen(i, headers=auth):
                    body = {"input_ids": [1, 4 + i], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
                    async with s.post(url + "/generate", json=body, headers=headers) as r:
                        return r.status, await r.json()
                answers = await asyncio.gather(*(gen(i) for i in range(6)))
                status_noauth, err = await gen(0, headers={})
                async with s.get(url + "/health") as r:
                    health = r.status
                async with s.get(url + "/get_weight_version", headers={"Authorization": "Bearer nope"}) as r:
                    wrong = r.status
                async with s.post(url + "/generate", data="{bad", headers=auth) as r:
                    bad = r.status, json.loads(await r.text())
            return answers, status_noauth, err, health, wrong, bad
        finally:
            await runner.cleanup()

    answers, status_noauth, err, health, wrong, bad = asyncio.run(main())
    assert all(st == 200 and len(a["output_ids"]) == 3 for st, a in answers)
    assert counting.batches == [6], counting.batches                 # six requests, one forward batch
    assert status_noauth == 401 and "Bearer" in err["error"]["message"]
    assert health == 200 and wrong == 401
    assert bad[0] == 400 and "not valid JSON" in bad[1]["error"]["message"]


ORPHANING_PARENT = """
import sys, time
from topd_ds.engines.launch import launch_server
srv = launch_server(sys.argv[1], startup_timeout_s=120)
print(srv.proc.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it, maybe late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_exits_when_its_launcher_is_killed(tiny_models):
    """A trainer SIGKILLed mid-run (no atexit, no cleanup) must not leave its server behind."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING_PARENT, tiny_models[1]], stdout=subprocess.PIPE,
                              text=True)
    server_pid = int(parent.stdout.readline())
    try:
        assert running(server_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and running(server_pid):
            time.sleep(0.2)
        if running(server_pid):
            raise AssertionError(f"server {server_pid} still running 20 s after its launcher was killed")
    finally:
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
