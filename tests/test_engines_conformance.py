"""The conformance suite (tests/conformance.py) against the built-in server, or against any server.

By default a `topd-ds serve` child is started once for this module on the tiny teacher model.
With TOPD_CONFORMANCE_URL (and TOPD_CONFORMANCE_MODEL, the model directory that server loaded) the
same checks run against that server instead: `make test-sglang` points them at real SGLang.
TOPD_CONFORMANCE_CHUNKED_URL names a second server on the same model that chunks its prefill finely (make
test-sglang: SGLang with --chunked-prefill-size 16); the long-sequence checks run there (else on the first).
TOPD_SERVE_DEVICE=cuda runs the built-in server on a GPU (the reference forward stays float32 on CPU).
"""

import os

import numpy as np
import pytest
import torch

import conformance


@pytest.fixture(scope="module")
def server(tiny_models):
    url, model = os.environ.get("TOPD_CONFORMANCE_URL"), os.environ.get("TOPD_CONFORMANCE_MODEL")
    if url:
        assert model, "TOPD_CONFORMANCE_MODEL: needed with TOPD_CONFORMANCE_URL (the served model dir)"
        yield url.rstrip("/"), model
        return
    from topd_ds.engines.launch import launch_server

    teacher_dir, _ = tiny_models
    device = os.environ.get("TOPD_SERVE_DEVICE", "cpu")
    with launch_server(teacher_dir, device=device, startup_timeout_s=120) as srv:
        yield srv.url, teacher_dir
        assert srv.alive(), "the server died during the conformance run"
    assert srv.proc.returncode == 0, f"SIGTERM did not shut the server down cleanly: {srv.proc.returncode}"


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
def test_conformance(server, check):
    url, model_dir = server
    check(url, model_dir)


def test_weight_update(server, tmp_path):
    url, model_dir = server
    conformance.check_weight_update(url, model_dir, str(tmp_path))


@pytest.mark.parametrize("route", ["distributed", "tensor"])
def test_weight_update_in_memory(server, tmp_path, route):
    url, model_dir = server
    conformance.check_weight_update_in_memory(url, model_dir, str(tmp_path), route)


CHUNK = 16  # the prefill chunk of the built-in chunked server, as make test-sglang's SGLang


@pytest.fixture(scope="module")
def chunked_server(server, tiny_models):
    """TOPD_CONFORMANCE_CHUNKED_URL; else, against a given TOPD_CONFORMANCE_URL, that server; else a second
    built-in server that answers prefill hidden states for the last 16-token chunk only, as chunked SGLang,
    so the client's re-ask for the head rows runs under make test."""
    url = os.environ.get("TOPD_CONFORMANCE_CHUNKED_URL")
    if url or os.environ.get("TOPD_CONFORMANCE_URL"):
        yield (url.rstrip("/"), server[1]) if url else server
        return
    from topd_ds.engines.launch import launch_server

    with launch_server(tiny_models[0], startup_timeout_s=120, chunked_prefill_size=CHUNK) as srv:
        yield srv.url, tiny_models[0]


@pytest.mark.parametrize("check", conformance.CHUNKED_CHECKS, ids=lambda c: c.__name__)
def test_long_sequences(chunked_server, check):
    url, model_dir = chunked_server
    check(url, model_dir)


def test_builtin_chunked_server_answers_the_last_chunk_only(chunked_server):
    """What the long-sequence checks above rely on to reach the re-ask path: a raw /generate of L tokens
    returns the hidden rows of positions [16 * floor((L - 1) / 16), L) only, equal to the forward's rows."""
    if os.environ.get("TOPD_CONFORMANCE_URL") or os.environ.get("TOPD_CONFORMANCE_CHUNKED_URL"):
        pytest.skip("the built-in server's chunked mode only")
    url, model_dir = chunked_server
    model = conformance.reference(model_dir)
    for length in (40, 32, 7):
        seq = conformance.random_prompts(model_dir, 1, lo=length, hi=length, seed=length)[0]
        status, body = conformance.call(url, "/generate", {
            "input_ids": seq, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_hidden_states": True})
        assert status == 200, body
        rows = np.asarray(body["meta_info"]["hidden_states"][0], dtype=np.float32)
        first = CHUNK * ((length - 1) // CHUNK)
        assert rows.shape == (length - first, model.config.hidden_size), (length, rows.shape)
        with torch.no_grad():
            want = conformance.ref_hidden(model, seq)[first:].numpy()
        assert abs(rows - want).max() < conformance.HIDDEN_TOL, length
