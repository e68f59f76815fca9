"""Security (issue 8, promise 6): servers bind the loopback address unless told otherwise, the api key is
enforced end to end, server answers of the wrong shape are refused, the trainer passes the key and the
teacher's hidden width to its clients, and no code path deserialises or executes data or server content."""

import asyncio
import os
import re
import types

import pytest

from topd_ds.engines.protocol import SamplingParams
from topd_ds.engines.sglang import SGLangClient
from topd_ds.errors import ProtocolError, ServerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"backoff": 0.001, "timeout_s": 30.0, "connect_timeout_s": 2.0, "max_retries": 1}


def _listening_addresses(port: int) -> set:
    """IPv4/IPv6 addresses (hex, as the kernel writes them) listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:   # 0A = LISTEN
                    found.add(addr)
    return found


def test_defaults_bind_loopback():
    import inspect

    from topd_ds.engines.launch import launch_server
    from topd_ds.engines.server import parse_args

    assert inspect.signature(launch_server).parameters["host"].default == "127.0.0.1"
    assert parse_args(["--model", "m"]).host == "127.0.0.1"


def test_serve_help_names_the_loopback_default(capsys):
    from topd_ds.engines.server import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--host HOST bind address (default: loopback only)" in help_text


def test_built_in_server_listens_on_loopback_and_enforces_the_api_key(tiny_models):
    """One real server (the tiny student, hidden size 32) launched as the trainer launches it."""
    from topd_ds.engines.launch import launch_server

    with launch_server(tiny_models[1], api_key="s3cret") as server:
        port = int(server.url.rsplit(":", 1)[1])
        assert server.url == f"http://127.0.0.1:{port}"
        if os.path.exists("/proc/net/tcp"):
            assert _listening_addresses(port) == {"0100007F"}           # 127.0.0.1, nothing else
        params = SamplingParams(max_new_tokens=2, temperature=0.0)

        async def calls():
            async with SGLangClient(server.url, api_key="s3cret", **FAST) as client:
                done = await client.generate([[1, 9, 14]], params)
                assert len(done) == 1 and 1 <= len(done[0][0].output_ids) <= 2
            for key in (None, "wrong"):
                async with SGLangClient(server.url, api_key=key, **FAST) as client:
                    with pytest.raises(ServerError, match="HTTP 401"):
                        await client.generate([[1, 9, 14]], params)
            # hidden states of the wrong width (a 32-wide model where 64 is expected) are refused
            async with SGLangClient(server.url, api_key="s3cret", hidden_size=64, **FAST) as client:
                with pytest.raises(ProtocolError, match=r"hidden_states\[0\]: hidden width 32 != expected 64"):
                    await client.score([[1, 9, 14, 10]], start=1, return_hidden=True)
        asyncio.run(calls())


def test_trainer_clients_carry_the_api_key_and_the_teacher_width(monkeypatch):
    from topd_ds.engines.startup import make_clients_factory

    def server(key):
        return types.SimpleNamespace(api_key=key, timeout_s=5.0, max_retries=1, max_concurrency=2, router=False)
    cfg = types.SimpleNamespace(student_server=server("from-yaml"), teacher_server=server(None))
    monkeypatch.setenv("TOPD_API_KEY", "from-env")

    async def make():
        student, teacher = await make_clients_factory(cfg, ["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                                                      teacher_hidden_size=64)()
        try:
            return student, teacher
        finally:
            await student.close()
            await teacher.close()
    student, teacher = asyncio.run(make())
    assert student.api_key == "from-yaml" and teacher.api_key == "from-env"
    assert teacher.hidden_size == 64 and student.hidden_size is None


def test_no_code_path_executes_or_unpickles_outside_data():
    """Data files and server answers are parsed as JSON/YAML (safe_load) only. The one unpickling load is
    checkpoint.load's RNG state, a file this trainer wrote into its own checkpoint (verified by the manifest)."""
    hits = []
    pattern = re.compile(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|torch\.load\(|"
                         r"trust_remote_code=True|shell=True|os\.system\(")
    for dirpath, _, names in os.walk(os.path.join(REPO, "topd_ds")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    for i, line in enumerate(f, 1):
                        if pattern.search(line):
                            hits.append((os.path.relpath(path, REPO), line.strip()))
    assert hits == [("topd_ds/checkpoint.py", "_set_rng_state(torch.load(rng, weights_only=False))")], hits
