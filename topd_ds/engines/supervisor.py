"""Keep the inference servers serving: restart a built-in server that failed, count failures, stop cleanly.

The trainer hands out each server's client wrapped by `Supervisor.guard(client, role)`: a ServerError raised
by one of its calls is tagged with the role ("student" / "teacher") and the server's *generation* (how many
times it had been restarted when the call began). Whoever made the call (the pipeline building the batch of
step k, a weight sync, an eval) awaits `recover(err)` and then does its whole piece of work again, from
scratch (a batch is rebuilt for the same step with the same seeds, never half-used):

    built-in server (the trainer launched it: server.urls empty)
        stop it (SIGTERM, then SIGKILL: it may hang), launch a new one on the same port with the newest
        weights (the student: the latest sync dir the trainer pushed, tagged with its weight version)
    user-given urls
        the trainer cannot restart them: wait until every url answers /health (at most timeout_s), load the
        role's newest weights into it unless it already reports their version (a server its operator
        restarted holds its old weights), retry
    a stale error (its call began before the latest restart of that server)
        retry at once without counting it: several calls in flight see one death
    a request the server rejected as invalid (RequestRejected: HTTP 4xx, e.g. prompt + max_new_tokens past the
        model's positions)
        a configuration error, not a server fault: ServerFailure at once with the server's message, no restart

Each recovery counts one failure of that server. More than `max_restarts` failures in a row (the count
returns to 0 once a batch has been built) raise `ServerFailure`: one line naming the server and the last
error; the trainer then saves a checkpoint and stops. The launched servers' pids, urls and weights are
written to run_dir/servers.json (rewritten at every restart) for operators and tests.

    sup = Supervisor(run_dir)
    sup.launched("student", launch_server(model), launch=lambda path, port, version: ..., weights=model,
                 max_restarts=3)
    student = sup.guard(SGLangClient([url]), "student")
    while True:
        try:
            return await build(step)
        except ServerError as err:
            await sup.recover(err)          # raises ServerFailure past the limit
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable

from topd_ds.engines.launch import ServerProcess, reload_weights, wait_healthy
from topd_ds.errors import RequestRejected, ServerError, TopdError

GUARDED = frozenset({"generate", "continue_from", "score", "update_weights", "flush_cache", "weight_version",
                     "init_weights_group", "update_weights_from_distributed", "update_weights_from_tensor"})
STOP_GRACE_S = 2.0    # a failed server gets this long after SIGTERM before SIGKILL (it may be hung)


class ServerFailure(TopdError, RuntimeError):
    """A server failed more than its max_restarts allows. Not a ServerError: nothing retries it."""


@dataclasses.dataclass
class Server:
    """One supervised role. `launch(weights, port, version) -> ServerProcess` is None for user-given urls."""
    role: str
    urls: list
    max_restarts: int
    launch: Callable | None = None
    proc: ServerProcess | None = None
    weights: str | None = None           # what a restart loads: the newest weights of this role
    version: str | None = None           # their weight version tag
    health_wait_s: float = 60.0          # user-given urls: how long to wait for /health after a failure
    api_key: str | None = None
    reload: Callable | None = None       # async, after a restart: in-memory weight routes send the newest again
    failures: int = 0                    # in a row; 0 again once a batch is built
    generation: int = 0                  # restarts so far
    last_error: str = ""

    def describe(self) -> str:
        if self.launch is None:
            return f"{self.role} server at {', '.join(self.urls)} (given in {self.role}_server.urls: not restartable)"
        pid = self.proc.proc.pid if self.proc is not None else "none"
        return f"built-in {self.role} server at {self.urls[0]} (pid {pid}, {self.generation} restarts)"


class Supervisor:
    """The servers of a run, their failure counts and their restarts (see module doc)."""

    def __init__(self, run_dir: str | None = None, *, log: Callable[[str], None] | None = None):
        self.run_dir = run_dir
        self.servers: dict[str, Server] = {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._lock: asyncio.Lock | None = None    # made lazily inside the pipeline's loop
        self._file_lock = threading.Lock()         # servers.json: the trainer's and the loop's threads write it

    # -- registration ---------------------------------------------------------------------------
    def launched(self, role: str, proc: ServerProcess, *, launch: Callable, weights: str, max_restarts: int,
                 version: str | None = None) -> Server:
        srv = Server(role, [proc.url], max_restarts, launch=launch, proc=proc, weights=weights, version=version)
        self.servers[role] = srv
        self._write_pids()
        return srv

    def external(self, role: str, urls, *, max_restarts: int, health_wait_s: float,
                 api_key: str | None = None) -> Server:
        srv = Server(role, list(urls), max_restarts, health_wait_s=health_wait_s, api_key=api_key)
        self.servers[role] = srv
        return srv

    def set_weights(self, role: str, path: str, version: str) -> None:
        """The newest weights of `role`: a restart from now on loads these (the trainer calls this before it
        asks the running server to load them, so a death during that update restarts with them)."""
        srv = self.servers[role]
        srv.weights, srv.version = path, version
        self._write_pids()

    def guard(self, client, role: str) -> Guarded:
        if role not in self.servers:
            raise KeyError(f"role {role!r}: not registered with the supervisor")
        return Guarded(client, role, self)

    def succeeded(self) -> None:
        """A batch was built: every server works again, their failure counts restart at 0."""
        for srv in self.servers.values():
            srv.failures = 0

    # -- recovery -------------------------------------------------------------------------------
    async def retry(self, make_coro):
        """(await make_coro(), retries): the whole call redone from scratch after each ServerError that
        `recover` returns from; its ServerFailure (too many failures in a row) propagates."""
        retries = 0
        while True:
            try:
                return await make_coro(), retries
            except ServerError as err:
                await self.recover(err)
                retries += 1

    async def recover(self, err: ServerError) -> None:
        """Make the server that raised `err` usable again, or raise ServerFailure past its max_restarts.

        Returns once the caller may retry. An error without a role (from an unguarded client) is re-raised."""
        role = getattr(err, "server_role", None)
        if role not in self.servers:
            raise err
        if isinstance(err, RequestRejected):   # the request was wrong, not the server: a restart would reload the
            # model and send the same request again (issue 24: three reloads before a run stopped on a 400)
            raise ServerFailure(f"{self.servers[role].describe()}: {_one_line(err)}; not restarted") from err
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            srv = self.servers[role]
            if getattr(err, "server_generation", srv.generation) < srv.generation:
                return                              # that call began before the latest restart
            while True:
                srv.failures += 1
                srv.last_error = _one_line(err)
                if srv.failures > srv.max_restarts:
                    raise ServerFailure(
                        f"{srv.describe()} failed {srv.failures} times in a row "
                        f"({role}_server.max_restarts={srv.max_restarts}); last error: {srv.last_error}")
                try:
                    if srv.launch is None:
                        self.log(f"topd-ds: {srv.describe()} failed ({srv.failures}/{srv.max_restarts}): "
                                 f"{srv.last_error}; waiting for it, then retrying")
                        await asyncio.to_thread(self._wait_external, srv)
                    else:
                        await asyncio.to_thread(self._restart, srv)
                    if srv.reload is not None:   # weights that live in the trainer's memory, not in srv.weights
                        await srv.reload()
                    return
                except ServerError as restart_err:   # the new server did not come up: one more failure
                    err = restart_err

    def _restart(self, srv: Server) -> None:
        old = srv.proc
        version = f" (weight version {srv.version})" if srv.version is not None else ""
        self.log(f"topd-ds: {srv.describe()} failed ({srv.failures}/{srv.max_restarts}): {srv.last_error}; "
                 f"restarting it with {srv.weights}{version}")
        if old is not None:
            old.stop(grace_s=STOP_GRACE_S)
        srv.proc = None
        srv.generation += 1
        port = int(srv.urls[0].rsplit(":", 1)[1])   # same port: the clients keep their urls
        srv.proc = srv.launch(srv.weights, port, srv.version)
        self._write_pids()
        self.log(f"topd-ds: restarted {srv.describe()}")

    def _wait_external(self, srv: Server) -> None:
        """Wait for every url's /health; a server that is back gets the newest weights of its role at once
        (it may have been restarted by its operator from its old weights), then the caller retries."""
        for url in srv.urls:
            try:
                wait_healthy(url, timeout_s=srv.health_wait_s, api_key=srv.api_key)
            except ServerError:
                return     # still down: the retry will fail and count once more
            if srv.weights is not None:
                try:
                    if reload_weights(url, srv.weights, srv.version, timeout_s=srv.health_wait_s, api_key=srv.api_key):
                        self.log(f"topd-ds: {srv.role} server at {url} is back: loaded {srv.weights} "
                                 f"(weight version {srv.version})")
                except ServerError as err:
                    self.log(f"topd-ds: {srv.role} server at {url} is back but did not load {srv.weights}: {err}")
                    return  # the retry fails or the next sync fixes it; either way it counts

    def stop_all(self) -> None:
        for srv in self.servers.values():
            if srv.proc is not None:
                srv.proc.stop()

    def _write_pids(self) -> None:
        """run_dir/servers.json: role -> pid, url, weights, version, restarts, log of each launched server."""
        if self.run_dir is None:
            return
        path = os.path.join(self.run_dir, "servers.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with self._file_lock:    # built and written under the lock: the newest state is the one that stays
            info = {role: {"pid": s.proc.proc.pid, "url": s.urls[0], "weights": s.weights,
                           "weight_version": s.version, "restarts": s.generation, "log": s.proc.log_path}
                    for role, s in self.servers.items() if s.proc is not None}
            with open(tmp, "w") as f:
                json.dump(info, f, indent=1)
            os.replace(tmp, path)


class Guarded:
    """A client whose server calls tag a ServerError with the role and the server's generation at call time."""

    def __init__(self, client, role: str, supervisor: Supervisor):
        self.client, self.role, self.supervisor = client, role, supervisor

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name not in GUARDED:
            return attr

        async def call(*args, **kwargs):
            generation = self.supervisor.servers[self.role].generation
            try:
                return await attr(*args, **kwargs)
            except ServerError as err:
                if not hasattr(err, "server_role"):
                    err.server_role, err.server_generation = self.role, generation
                raise
        return call


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:600]
