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
deployment cannot use, before any model is loaded):
    disk         (default) the directory above + update_weights_from_disk. Works everywhere, also through a router.
    tensor       update_weights_from_tensor with a handle to shared memory (CUDA IPC on GPUs, /dev/shm on CPU):
                 no file, no copy over HTTP; every student server must run on this machine.
    distributed  update_weights_from_distributed: rank 0 and the servers form their own torch.distributed group
                 (NCCL on GPUs, gloo on CPU; `train.weight_sync_master` is where rank 0 listens) and rank 0
                 broadcasts each tensor while the request announcing them is in flight. For servers elsewhere.
The in-memory routes keep the gathered weights in rank 0's memory (the served version and the one in flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from urllib.parse import urlparse

import torch

from topd_ds import distributed as ds
from topd_ds.engines.supervisor import ServerFailure
from topd_ds.weight_group import check_bindable, destroy_group, free_port, init_group, serialize_named_tensors

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
        backend = t.weight_sync_backend
        out["backend"] = ("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend
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
    `self.failure` (rank 0), not raised mid-collective; the loop stops on it."""

    def __init__(self, engine, pipeline, tokenizer, root: str, supervisor=None, *, dtype: torch.dtype | None = None,
                 route: str = "disk", master: tuple[str, int] | None = None, backend: str = "gloo",
                 group_timeout_s: float = 600.0):
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
                named = [(k, v.to(self.dtype) if v.is_floating_point() else v) for k, v in state.items()]
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
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

            def broadcast():
                for _, t in named:   # one at a time: only one tensor of the model on the GPU at once
                    torch.distributed.broadcast(t.to(device) if device is not None else t, src=0, group=self.group)
            await client.update_weights_from_distributed(
                [n for n, _ in named], [str(t.dtype).removeprefix("torch.") for _, t in named],
                [list(t.shape) for _, t in named], str(version), broadcast)
        except Exception:
            self._drop_group()   # a half-done broadcast leaves the group unusable: the retry joins anew
            raise

    async def _reload(self) -> None:
        """Supervisor hook after a student server restart: send it the weights it held before, if any."""
        self._drop_group()
        if self.loaded is not None:
            await self._send_memory(*self.loaded)

    def _drop_group(self):
        if self.group is not None:
            destroy_group(self.group)
            self.group = None

    def close(self):
        """Rank 0 at the end of the run: the last sync dir is no longer needed (the export is in run_dir/final);
        on /dev/shm it would hold RAM until reboot. Our end of the weight-update group is released (the
        servers' end dies with them: the pipeline's loop may be closed already, so they are not called)."""
        self._drop_group()
        self.loaded = self.payload = None
        if ds.rank() == 0 and self.root.startswith(SHM + os.sep):
            shutil.rmtree(self.root, ignore_errors=True)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
