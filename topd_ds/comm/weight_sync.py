"""Push the student's weights to its inference server(s) after an optimizer step, without stalling the loop.

    sync = WeightSync(engine, pipeline, tokenizer, root=sync_root(cfg.train.sync_dir, cfg.run_dir, ...))
    sync.push(step)       # collective: gather ZeRO-3 shards, write root/step-N atomically; rank 0 sends the update
    sync.wait()           # rank 0: the previous update has landed (or failed: self.failure)
    sync.close()          # rank 0: remove what is left under root when it is a RAM disk

Where the weights go (`train.sync_dir`): an absolute path, because a user-given server started in another
directory must open it (a relative `runs/...` was read against the server's working directory). `auto`
puts them on /dev/shm (RAM: no disk write, and the server reads them at memory speed) when it exists, has room
for two versions, and every student server runs on this machine; else under run_dir/sync (absolute).
In what dtype: the training dtype (bf16 when the DeepSpeed config enables bf16, as on GPUs; fp32 on the CPU),
so a 4B student is 8 GB a sync, not 16 GB of fp32; servers cast to their own dtype on load.
How they travel (`train.weight_sync`, docs/ENGINES.md "Weight sync routes"; `check_route` refuses a route the
deployment cannot use from the config alone, `check_route_servers` from the servers' /get_server_info, both
before any model is loaded; the tensor route's /dev/shm room once the student is loaded, before any server starts):
    disk         (default) the directory above + update_weights_from_disk. Works everywhere, also through a router
                 and with data-parallel servers (--dp 2).
    tensor       update_weights_from_tensor with a handle to /dev/shm: the gathered weights are CPU tensors
                 (distributed.gathered_state_dict), so the handle names a shared-memory file, never CUDA IPC; no
                 file on disk, no copy over HTTP. Every student server on this machine, dp 1, room on /dev/shm
                 for two versions (the served one and the one in flight).
    distributed  update_weights_from_distributed: rank 0 and the servers form their own torch.distributed group
                 (NCCL on GPUs, gloo on CPU; `train.weight_sync_master` is where rank 0 listens) and rank 0
                 broadcasts each tensor while the request announcing them is in flight. For servers elsewhere;
                 dp 1 and, over NCCL, the same NCCL version on both sides. A broadcast that fails after the group
                 was joined is aborted and that version goes by disk instead (`_send_memory`).
The in-memory routes keep the gathered weights in rank 0's memory (the served version and the one in flight)
and are opt-in: no GPU run has confirmed them yet (docs/ENGINES.md says what was tested where).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import threading
import time
from urllib.parse import urlparse

import torch

from topd_ds.comm import distributed as ds
from topd_ds.engines.supervisor import ServerFailure
from topd_ds.errors import ServerError
from topd_ds.comm.weight_group import check_bindable, destroy_group, free_port, init_group, serialize_named_tensors

SHM = "/dev/shm"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in LOCAL_HOSTS or (urlparse(url).hostname or "").startswith("127.")


def training_dtype(engine) -> torch.dtype:
    """The dtype the DeepSpeed engine trains in: what the synced weights are written in."""
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    if getattr(engine, "fp16_enabled", lambda: False)():
        return torch.float16
    return torch.float32


def sync_root(sync_dir: str, run_dir: str, student_urls, *, model_bytes: int, shm: str = SHM) -> str:
    """The absolute directory the syncs of this run are written to (see module doc).

    auto -> shm/topd-ds-sync/<hash of the absolute run_dir> if `shm` exists, holds 2 x model_bytes free and
    every student url is on this machine (empty urls: built-in servers, launched here); else run_dir/sync."""
    run_dir = os.path.abspath(run_dir)
    if sync_dir != "auto":
        return os.path.abspath(sync_dir)
    if os.path.isdir(shm) and all(is_local(u) for u in student_urls):
        try:
            free = shutil.disk_usage(shm).free
        except OSError:
            free = 0
        if free >= 2 * model_bytes:
            tag = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
            return os.path.join(shm, "topd-ds-sync", f"{os.path.basename(run_dir)}-{tag}")
    return os.path.join(run_dir, "sync")


def model_bytes(engine, dtype: torch.dtype) -> int:
    """Bytes of the student's weights in `dtype` (ZeRO-3 parameters report their full size in ds_numel)."""
    n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return n * torch.tensor([], dtype=dtype).element_size()


ROUTES = ("disk", "tensor", "distributed")


def check_route(cfg) -> None:
    """The weight-sync route's requirements, one ConfigError line naming the key, before any model is loaded."""
    from topd_ds.errors import ConfigError

    t, urls = cfg.train, cfg.student_server.urls
    if t.weight_sync == "disk":
        return
    if cfg.student_server.router:
        raise ConfigError(f"train.weight_sync: {t.weight_sync} sends to each server itself; it cannot go through "
                          f"a router (student_server.router=true): list the servers in student_server.urls or use disk")
    remote = [u for u in urls if not is_local(u)]
    if t.weight_sync == "tensor" and remote:
        raise ConfigError(f"train.weight_sync: tensor hands over a shared-memory handle, so every student server must "
                          f"run on this machine; {remote[0]} is not local: use distributed or disk")
    if t.weight_sync == "distributed":
        if t.weight_sync_backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("train.weight_sync_backend: nccl needs a GPU on the trainer; this one has none: use gloo")
        if t.weight_sync_master == "auto":
            if remote:
                raise ConfigError(f"train.weight_sync_master: set HOST:PORT that {remote[0]} can reach this trainer "
                                  f"at (auto works only when every student server is on this machine)")
            return
        host, port = parse_master(t.weight_sync_master)
        why = check_bindable(host, port)
        if why:
            raise ConfigError(f"train.weight_sync_master: {why}; the trainer's rank 0 hosts the weight-update group "
                              f"there")


# SGLang release -> the NCCL its pinned torch ships. Read from the wheels' metadata on PyPI, 2026-12-06
# (`pip --isolated install --dry-run --no-deps --report R.json torch==V`): sglang 0.5.23 requires torch==2.14.1,
# which requires nvidia-nccl-cu13==2.30.7; the trainer's torch 2.13.0 requires nvidia-nccl-cu13==2.29.7. NCCL
# builds no communicator across versions, so a trainer on 2.13.0 and SGLang 0.5.23 cannot share the group.
SGLANG_NCCL = {"0.5.23": "2.30.7"}
SERVER_INFO_TIMEOUT_S = 30.0     # one GET /get_server_info at start (a busy server answers it between batches)


def trainer_nccl() -> str | None:
    """This process's NCCL version "2.29.7", or None without CUDA/NCCL."""
    try:
        return ".".join(str(v) for v in torch.cuda.nccl.version()) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def route_problems(route: str, backend: str, infos: dict, *, trainer_nccl: str | None,
                   server_nccl: str = "auto") -> list[str]:
    """One line per reason the student servers cannot take `route`; pure.

    infos: url -> its /get_server_info answer (SGLang: the resolved launch flags at the top level, "dp_size",
    "tp_size", and "version", sglang/srt/entrypoints/http_server.py:854-891, server_args.py:316-333), or None for
    a server without that endpoint (the built-in `topd-ds serve`: this package, this torch, dp 1).
    backend: the resolved one ("nccl" or "gloo"). server_nccl: train.weight_sync_nccl ("auto": SGLANG_NCCL)."""
    if route == "disk":
        return []
    out = []
    for url, info in infos.items():
        if not isinstance(info, dict):
            continue
        dp = info.get("dp_size", 1)
        if isinstance(dp, int) and dp > 1:
            # SGLang 0.5.23 asserts dp_size == 1 for init/destroy group and both in-memory updates
            # (managers/tokenizer_control_mixin.py:451, 464, 509, 569): HTTP 500 after the join's timeout
            out.append(f"train.weight_sync: {route} needs student servers with dp_size 1 (SGLang refuses in-memory "
                       f"updates with data-parallel replicas); {url} runs --dp-size {dp}: use train.weight_sync: "
                       f"disk, or launch each replica as its own server and list every URL in student_server.urls")
        if route == "distributed" and backend == "nccl":
            version = info.get("version")
            theirs = server_nccl if server_nccl != "auto" else SGLANG_NCCL.get(str(version))
            if theirs is None:
                out.append(f"train.weight_sync_nccl: cannot tell the NCCL version of {url} (SGLang {version}; known: "
                           f"{', '.join(SGLANG_NCCL)}): set it (python -c 'import torch; print(torch.cuda.nccl."
                           f"version())' in the server's environment) or use train.weight_sync: disk")
            elif trainer_nccl is not None and theirs != trainer_nccl:
                out.append(f"train.weight_sync: distributed over NCCL needs one NCCL version on both sides; {url} "
                           f"(SGLang {version}) has NCCL {theirs}, this trainer {trainer_nccl} (torch "
                           f"{torch.__version__}): install the server's torch in the trainer's environment, or use "
                           f"train.weight_sync: disk (docs/ENGINES.md \"Weight sync routes\")")
    return out


def check_route_servers(cfg, fetch=None) -> None:
    """The in-memory routes' requirements on the running student servers (dp 1; NCCL versions), read from
    each url's /get_server_info before any model is loaded; ConfigError with the first problem. Nothing to do
    for disk or for built-in servers. `fetch(url) -> dict | None` replaces the HTTP call in tests."""
    from topd_ds.errors import ConfigError

    t, urls = cfg.train, cfg.student_server.urls
    if t.weight_sync == "disk" or not urls:
        return
    if fetch is None:
        api_key = cfg.student_server.api_key or os.environ.get("TOPD_API_KEY")

        def fetch(url):
            from topd_ds.engines.launch import _call_json
            try:
                status, body = _call_json(url, "/get_server_info", timeout_s=SERVER_INFO_TIMEOUT_S, api_key=api_key)
            except ServerError as err:
                raise ConfigError(f"student_server.urls: {url} did not answer /get_server_info ({err}); "
                                  f"train.weight_sync={t.weight_sync} checks the servers before start: start them "
                                  f"first") from None
            return body if status == 200 and isinstance(body, dict) else None
    backend = resolve_backend(t.weight_sync_backend)
    problems = route_problems(t.weight_sync, backend, {u: fetch(u) for u in urls}, trainer_nccl=trainer_nccl(),
                              server_nccl=t.weight_sync_nccl)
    if problems:
        raise ConfigError(problems[0])


def shm_problem(model_bytes: int, shm: str = SHM) -> str | None:
    """None if `shm` holds two versions of the model (the tensor route's served one and the one in flight),
    else one line saying how much is missing. A container's default /dev/shm is 64 MB."""
    try:
        free = shutil.disk_usage(shm).free
    except OSError as err:
        return f"train.weight_sync: tensor hands the weights over in {shm}, which cannot be read ({err})"
    need = 2 * model_bytes
    if free < need:
        return (f"train.weight_sync: tensor needs room for two versions of the student in {shm} "
                f"({need / 2**30:.2f} GiB), {free / 2**30:.2f} GiB free: enlarge it (docker --shm-size) or use "
                f"train.weight_sync: disk")
    return None


def check_shm_room(route: str, engine, dtype: torch.dtype, shm: str = SHM) -> None:
    """The tensor route: ConfigError (one line) unless `shm` holds two versions of the student in `dtype`."""
    if route == "tensor":
        why = shm_problem(model_bytes(engine, dtype), shm)
        if why:
            from topd_ds.errors import ConfigError
            raise ConfigError(why)


def resolve_backend(backend: str) -> str:
    return ("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend


def parse_master(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 in brackets) -> (host, port); ConfigError naming train.weight_sync_master."""
    from topd_ds.errors import ConfigError

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"train.weight_sync_master: expected HOST:PORT with a port in 1..65535, got {text!r}")
    return host, int(port)


def resolve_route(cfg) -> dict:
    """WeightSync's route keyword arguments from the config (master and backend resolved)."""
    t = cfg.train
    out = {"route": t.weight_sync, "group_timeout_s": cfg.student_server.timeout_s}
    if t.weight_sync == "distributed":
        if t.weight_sync_master == "auto":
            out["master"] = ("127.0.0.1", free_port("127.0.0.1"))
        else:
            out["master"] = parse_master(t.weight_sync_master)
        out["backend"] = resolve_backend(t.weight_sync_backend)
    return out


class WeightSync:
    """Gather the weights of step N (collective) and hand them to rank 0's update, sent in the background:
    the server may be busy with the next rollouts, and the trainer need not wait for that. The update is sent
    only once the pipeline's builds that must be sampled by an older version are done (`Pipeline.wait_built`:
    the fixed lag). At most one update is outstanding: the next push (or `wait()`) first waits for the
    previous one. The pipeline learns the new version only when the server has loaded it, so its staleness
    cap (and max_staleness=0's synchronous mode) holds exactly. The route (`train.weight_sync`, module doc)
    changes only how the weights travel:

        disk         written to root/step-N (atomically); update_weights_from_disk
        tensor       kept in rank 0's memory (shared memory); update_weights_from_tensor with a handle to it
        distributed  kept in rank 0's memory; update_weights_from_distributed, broadcast over the weight group
                     (`master`: (host, port) the servers reach rank 0 at; joined once, again after a failure)

    Server faults: with disk, the new directory becomes the supervisor's student weights when the update is
    sent, so a student server restarted (or a user-given one coming back) from then on loads it, and only then
    is the previous directory deleted. With the in-memory routes there is no directory: the supervisor calls
    `_reload` after a restart, which sends the last weights the server had loaded again (kept on rank 0 until
    the next version has landed). A failed update is sent again after `recover`. A ServerFailure is kept in
    `self.failure` (rank 0), not raised mid-collective; the loop stops on it.

    distributed, a broadcast that fails once the group is joined (a server gave up half-way): the group is
    aborted (NCCL: its pending ops cancelled, so the watchdog does not kill rank 0) and that version is written
    from rank 0's memory to root/step-N and sent by update_weights_from_disk; the next version joins anew."""

    def __init__(self, engine, pipeline, tokenizer, root: str, supervisor=None, *, dtype: torch.dtype | None = None,
                 route: str = "disk", master: tuple[str, int] | None = None, backend: str = "gloo",
                 group_timeout_s: float = 600.0, shm: str = SHM):
        if route not in ROUTES:
            raise ValueError(f"train.weight_sync: must be one of {ROUTES}, got {route!r}")
        if route == "distributed" and master is None:
            raise ValueError("train.weight_sync_master: needed for train.weight_sync=distributed")
        self.engine, self.pipeline, self.tokenizer, self.supervisor = engine, pipeline, tokenizer, supervisor
        self.route, self.master, self.backend, self.group_timeout_s = route, master, backend, group_timeout_s
        self.root = os.path.abspath(root)
        self.dtype = dtype or training_dtype(engine)
        self.pending = None   # (future, path) of the update in flight
        self.failure = None   # ServerFailure of an update (rank 0)
        self.stats = {}       # bytes and seconds of the last push (rank 0)
        self.loaded = None    # in-memory routes, rank 0: (version, named tensors) the server holds
        self.group = None     # distributed, rank 0: our end of the weight-update group
        self.payload = None   # tensor, rank 0: (version, serialized handle) of the update being sent
        self.fallback = None  # distributed, rank 0: the directory of the last version sent by disk instead
        self._stream = None   # distributed over nccl, rank 0: the CUDA stream the broadcasts run on
        check_shm_room(route, engine, self.dtype, shm)   # every rank: all stop together, before the first gather
        if ds.rank() == 0 and route == "disk" and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)   # a killed run's leftovers (RAM on /dev/shm)
        if ds.rank() == 0 and route != "disk" and supervisor is not None and "student" in supervisor.servers:
            supervisor.servers["student"].reload = self._reload

    def wait(self):
        if self.pending is not None:
            future, path = self.pending
            self.pending = None
            try:
                future.result()
            except ServerFailure as err:
                self.failure = err
            return path
        return None

    def push(self, step: int) -> float:
        t0 = time.perf_counter()
        previous = self.wait() if ds.rank() == 0 else None
        # rank 0 may have waited minutes for the server to load the previous sync: the others meet it here,
        # with a named timeout, not inside the gathers of save_consolidated
        ds.wait_for_rank0(f"waiting for the student server to load the weights synced before step {step}")
        path = os.path.join(self.root, f"step-{step:08d}") if self.route == "disk" else None
        named = None
        if self.route == "disk":
            ds.save_consolidated(self.engine, path, self.tokenizer, dtype=self.dtype)
        else:
            state = ds.gathered_state_dict(self.engine.module)      # collective; full tensors on rank 0 only
            if ds.rank() == 0:
                named = [(k, self._host_copy(v)) for k, v in state.items()]
            del state
        if ds.rank() == 0:
            size = _dir_bytes(path) if path else sum(t.numel() * t.element_size() for _, t in named)
            self.stats = {"sync/bytes": size, "time/sync_write_s": time.perf_counter() - t0}
        if ds.rank() == 0 and self.failure is None:
            async def update():
                # fixed lag: the builds that must still be sampled by an older version finish first
                await self.pipeline.wait_built(step)
                if path is not None:
                    if self.supervisor is not None and "student" in self.supervisor.servers:
                        self.supervisor.set_weights("student", path, str(step))  # before `previous` goes: a
                    if previous and previous != path:                            # restart may happen any moment
                        shutil.rmtree(previous, ignore_errors=True)

                    def send():
                        return self.pipeline.student.update_weights(path, str(step))
                else:
                    def send():
                        return self._send_memory(step, named)
                if self.supervisor is None:
                    await send()
                else:
                    try:
                        await self.supervisor.retry(send)
                    except ServerFailure as failure:
                        self.pipeline.fail(failure)  # build(step + 1) waits for this version: never
                        raise
                if named is not None:
                    self.loaded, self.payload = (step, named), None   # the previous version's memory goes
                self.pipeline.publish_version(step)
            self.pending = (asyncio.run_coroutine_threadsafe(update(), self.pipeline.loop), path)
        return time.perf_counter() - t0

    async def _send_memory(self, version: int, named) -> None:
        """One in-memory update of the student server(s) to `named`, tagged `version` (pipeline loop)."""
        client = self.pipeline.student
        if self.route == "tensor":
            if self.payload is None or self.payload[0] != version:
                self.payload = (version, await asyncio.to_thread(serialize_named_tensors, named))
            await client.update_weights_from_tensor(self.payload[1], str(version))
            return
        try:
            if self.group is None:
                host, port = self.master

                def join(world_size):
                    self.group = init_group(backend=self.backend, master_address=host, master_port=port,
                                            world_size=world_size, rank=0, timeout_s=self.group_timeout_s)
                await client.init_weights_group(master_address=host, master_port=port, backend=self.backend,
                                                join=join)
        except Exception:
            self._drop_group()   # the retry joins anew
            raise
        stop = threading.Event()   # set when a server's announce failed: the broadcast stops waiting for it
        try:
            await client.update_weights_from_distributed(
                [n for n, _ in named], [str(t.dtype).removeprefix("torch.") for _, t in named],
                [list(t.shape) for _, t in named], str(version), lambda: self._broadcast(named, stop),
                abort=stop.set)
        except Exception as err:
            self._drop_group(abort=True)   # a half-done broadcast leaves the group unusable: cancel what is pending
            print(f"topd-ds: weight sync {version} by update_weights_from_distributed failed "
                  f"({type(err).__name__}: {err}); sending this version by disk", file=sys.stderr, flush=True)
            await self._send_disk(version, named)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's copy of one gathered tensor in the training dtype; in pinned memory when the broadcast goes
        over NCCL, so its host-to-GPU copy is an async DMA on the broadcast's stream (a pageable copy is staged
        by the driver and blocks this thread). Pinning costs page-locked RAM: two versions of the model."""
        dtype = self.dtype if t.is_floating_point() else t.dtype
        if self.route == "distributed" and self.backend == "nccl":
            return torch.empty(t.shape, dtype=dtype, pin_memory=True).copy_(t)
        return t.to(dtype)

    def _broadcast(self, named, stop: threading.Event) -> None:
        """Rank 0 sends each tensor over the weight group, in order (a thread of the pipeline's loop).

        NCCL: on a dedicated CUDA stream, not the default one: that thread's legacy default stream synchronises
        with every other blocking stream of the device, so the training step's kernels (main thread) would queue
        behind the servers' receive. ProcessGroupNCCL runs the collective on its own stream after the current
        one and records the tensor's memory to it (torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp, collective():
        syncStream, recordStream), so one GPU copy at a time is enough. The end is polled, not waited on: a
        server that gave up (`stop`) must not leave this thread blocked until the NCCL timeout. Gloo: plain
        blocking broadcasts (its own timeout applies)."""
        if self.backend != "nccl":
            for _, t in named:
                torch.distributed.broadcast(t, src=0, group=self.group)
            return
        # the engine's device, not this thread's current one (a new thread starts on cuda:0)
        device = getattr(self.engine, "device", None)
        if not isinstance(device, torch.device) or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            for _, t in named:
                if stop.is_set():
                    raise ServerError("weight broadcast: a student server gave up; aborted")
                torch.distributed.broadcast(t.to(device, non_blocking=True), src=0, group=self.group)
            done = torch.cuda.Event()
            done.record(self._stream)
        deadline = time.monotonic() + self.group_timeout_s
        while not done.query():
            if stop.is_set() or time.monotonic() > deadline:
                raise ServerError(f"weight broadcast: not done within {self.group_timeout_s:g} s "
                                  f"(student_server.timeout_s), or a student server gave up; aborted")
            time.sleep(0.01)

    async def _send_disk(self, version: int, named) -> None:
        """This version by update_weights_from_disk: written from rank 0's memory (no collective) to
        root/step-N; the supervisor restarts servers from it; the previous fallback directory goes."""
        path = os.path.join(self.root, f"step-{version:08d}")

        def write():
            from topd_ds.fsutil import atomic_dir
            with atomic_dir(path) as tmp:
                self.engine.module.save_pretrained(tmp, state_dict=dict(named), safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
        await asyncio.to_thread(write)
        if self.supervisor is not None and "student" in self.supervisor.servers:
            self.supervisor.set_weights("student", path, str(version))
        await self.pipeline.student.update_weights(path, str(version))
        if self.fallback and self.fallback != path:
            shutil.rmtree(self.fallback, ignore_errors=True)
        self.fallback = path

    async def _reload(self) -> None:
        """Supervisor hook after a student server restart: send it the weights it held before, if any."""
        self._drop_group()
        if self.loaded is not None:
            await self._send_memory(*self.loaded)

    def _drop_group(self, abort: bool = False):
        if self.group is not None:
            destroy_group(self.group, abort=abort and self.backend == "nccl")
            self.group = None

    def close(self):
        """Rank 0 at the end of the run: the last sync dir is no longer needed (the export is in run_dir/final);
        on /dev/shm it would hold RAM until reboot. Our end of the weight-update group is released (the
        servers' end dies with them: the pipeline's loop may be closed already, so they are not called)."""
        self._drop_group()
        self.loaded = self.payload = None
        if ds.rank() == 0 and self.fallback:
            shutil.rmtree(self.fallback, ignore_errors=True)
        if ds.rank() == 0 and self.root.startswith(SHM + os.sep):
            shutil.rmtree(self.root, ignore_errors=True)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
