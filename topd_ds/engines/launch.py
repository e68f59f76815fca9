"""Start the built-in server (`python -m topd_ds.engines.server`) as a child process, and never leak it.

    with launch_server(model_dir) as srv:          # waits for GET /health
        client = SGLangClient(srv.url)
        ...
    # leaving the block (or srv.stop(), or interpreter exit, also after an exception) sends SIGTERM to
    # the server's process group, then SIGKILL after `STOP_GRACE_S`. If this process is SIGKILLed and
    # runs no cleanup at all, the server notices it was orphaned (--exit-with-parent) and exits itself.

The trainer uses this when its config names no server URL (the embedded default).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref

from topd_ds.errors import ServerError

DEFAULT_STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
POLL_S = 0.2
# One GET /health may take as long as SGLang's own health check: in SGLang 0.5.x /health runs a one-token
# generation through the scheduler and answers 503 only after SGLANG_HEALTH_CHECK_TIMEOUT (default 20 s;
# sglang/srt/environ.py, entrypoints/http_server.py health_generate). A busy server (long prefills queued
# ahead of the probe) answers in 1-20 s; a shorter probe would call it dead. Margin over the 20 s.
HEALTH_PROBE_TIMEOUT_S = 30.0

_live: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running `topd-ds serve` child: `.url`, `.stop()`, context manager, stopped at exit."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: str):
        self.proc, self.url, self.log_path = proc, url, log_path
        _live.add(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, wait up to grace_s, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        _live.discard(self)
        return self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"ServerProcess(pid={self.proc.pid}, url={self.url!r}, alive={self.alive()})"


@atexit.register
def _stop_all():
    for srv in list(_live):
        srv.stop(grace_s=3.0)


def wait_healthy(url: str, *, timeout_s: float, proc: subprocess.Popen | None = None,
                 api_key: str | None = None) -> None:
    """Poll GET url/health until it answers 200; ServerError on timeout or if `proc` exits. Each probe may
    take up to HEALTH_PROBE_TIMEOUT_S (SGLang's /health runs a generation), within the overall `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server at {url} exited with code {proc.returncode} before it was healthy")
        probe_s = max(0.5, min(HEALTH_PROBE_TIMEOUT_S, deadline - time.monotonic()))  # never past the deadline
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=headers),
                                        timeout=probe_s) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(POLL_S)
    raise ServerError(f"server at {url} not healthy after {timeout_s:.0f} s")


def _call_json(url: str, path: str, body=None, *, timeout_s: float, api_key: str | None = None):
    """(status, parsed JSON body) of one plain HTTP call (no retries); ServerError if nothing answers."""
    import json

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, text = resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        raise ServerError(f"{'GET' if data is None else 'POST'} {url}{path}: no answer within {timeout_s:g} s "
                          f"({type(err).__name__}: {err})") from err
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def reload_weights(url: str, path: str, version: str, *, timeout_s: float, api_key: str | None = None) -> bool:
    """Make the server at `url` hold `path` tagged `version`: nothing if it already reports that version (it
    was only slow, not restarted), else POST /update_weights_from_disk. True if it loaded them; ServerError
    if it refused."""
    status, info = _call_json(url, "/model_info", timeout_s=timeout_s, api_key=api_key)
    if status == 200 and isinstance(info, dict) and info.get("weight_version") == version:
        return False
    status, body = _call_json(url, "/update_weights_from_disk", {"model_path": path, "weight_version": version},
                              timeout_s=timeout_s, api_key=api_key)
    if not (isinstance(body, dict) and body.get("success") is True):
        msg = body.get("message") if isinstance(body, dict) else body
        raise ServerError(f"{url}/update_weights_from_disk: failed (HTTP {status}) reloading {path}: {msg}")
    return True


def launch_server(model_dir: str, *, port: int | None = None, host: str = "127.0.0.1", device: str = "cpu",
                  dtype: str = "float32", api_key: str | None = None, max_batch: int | None = None,
                  batch_window_ms: float | None = None, weight_version: str | None = None,
                  startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, cwd: str | None = None,
                  hidden_states: bool = True, chunked_prefill_size: int | None = None) -> ServerProcess:
    """Start `python -m topd_ds.engines.server` in its own process group and wait until healthy.

    `weight_version` tags the loaded weights (as SGLang's --weight-version): a student server restarted with
    the trainer's newest synced weights reports their version, not "default"."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "topd_ds.engines.server", "--model", model_dir, "--host", host,
           "--port", str(port), "--device", device, "--dtype", dtype, "--exit-with-parent"]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    if batch_window_ms is not None:
        cmd += ["--batch-window-ms", str(batch_window_ms)]
    if weight_version is not None:
        cmd += ["--weight-version", str(weight_version)]
    if not hidden_states:   # refuse return_hidden_states, as SGLang without --enable-return-hidden-states
        cmd += ["--no-hidden-states"]
    if chunked_prefill_size is not None:  # hidden states of the last prefill chunk only, as chunked SGLang
        cmd += ["--chunked-prefill-size", str(chunked_prefill_size)]
    fd, log_path = tempfile.mkstemp(prefix=f"topd-serve-{port}-", suffix=".log")
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd)   # own process group: killpg reaches it all
    srv = ServerProcess(proc, f"http://{host}:{port}", log_path)
    try:
        wait_healthy(srv.url, timeout_s=startup_timeout_s, proc=proc)
    except BaseException as err:
        srv.stop(grace_s=2.0)
        if isinstance(err, ServerError):
            raise ServerError(f"{err}; log tail: {srv.log_tail(500)!r}") from err
        raise
    return srv
