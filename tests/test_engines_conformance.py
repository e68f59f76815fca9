"""The conformance suite (tests/conformance.py) against the built-in server, or against any server.

By default a `topd-ds serve` child is started once for this module on the tiny teacher model.
With TOPD_CONFORMANCE_URL (and TOPD_CONFORMANCE_MODEL, the model directory that server loaded) the
same checks run against that server instead: `make test-sglang` points them at real SGLang.
TOPD_CONFORMANCE_CHUNKED_URL names a second server on the same model that chunks its prefill finely (make
test-sglang: SGLang with --chunked-prefill-size 16); the long-sequence checks run there (else on the first).
TOPD_SERVE_DEVICE=cuda runs the built-in server on a GPU (the reference forward stays float32 on CPU).
"""

import os

import pytest

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


@pytest.fixture(scope="module")
def chunked_server(server):
    url = os.environ.get("TOPD_CONFORMANCE_CHUNKED_URL")
    return (url.rstrip("/"), server[1]) if url else server


@pytest.mark.parametrize("check", conformance.CHUNKED_CHECKS, ids=lambda c: c.__name__)
def test_long_sequences(chunked_server, check):
    url, model_dir = chunked_server
    check(url, model_dir)
