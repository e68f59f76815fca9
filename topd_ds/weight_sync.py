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
Only update_weights_from_disk is used: the in-memory routes SGLang offers (update_weights_from_tensor for a
colocated server, update_weights_from_distributed over NCCL) are not wired in yet (docs/ENGINES.md).
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


class WeightSync:
    """Write the weights of step N to root/step-N (collective), then rank 0 sends update_weights_from_disk with
    weight version N in the background: the server may be busy with the next rollouts, and the trainer need
    not wait for that. The update is sent only once the pipeline's builds that must be sampled by an older
    version are done (`Pipeline.wait_built`: the fixed lag). At most one update is outstanding: the next push (or `wait()`) first waits for the
    previous one. The pipeline learns the new version only when the server has loaded it, so its staleness
    cap (and max_staleness=0's synchronous mode) holds exactly.

    Server faults: the new directory becomes the supervisor's student weights when the update is sent, so
    a student server restarted (or a user-given one coming back) from then on loads it, and only then is the
    previous directory deleted; a failed update is sent again after `recover`. A ServerFailure is kept in
    `self.failure` (rank 0), not raised mid-collective; the loop stops on it."""

    def __init__(self, engine, pipeline, tokenizer, root: str, supervisor=None, *, dtype: torch.dtype | None = None):
        self.engine, self.pipeline, self.tokenizer, self.supervisor = engine, pipeline, tokenizer, supervisor
        self.root = os.path.abspath(root)
        self.dtype = dtype or training_dtype(engine)
        self.pending = None   # (future, path) of the update in flight
        self.failure = None   # ServerFailure of an update (rank 0)
        self.stats = {}       # bytes and seconds of the last push (rank 0)
        if ds.rank() == 0 and os.path.isdir(self.root):
            shutil.rmtree(self.root, ignore_errors=True)   # a killed run's leftovers (RAM on /dev/shm)

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
        path = os.path.join(self.root, f"step-{step:08d}")
        ds.save_consolidated(self.engine, path, self.tokenizer, dtype=self.dtype)
        if ds.rank() == 0:
            self.stats = {"sync/bytes": _dir_bytes(path), "time/sync_write_s": time.perf_counter() - t0}
        if ds.rank() == 0 and self.failure is None:
            async def update():
                # fixed lag: the builds that must still be sampled by an older version finish first
                await self.pipeline.wait_built(step)
                if self.supervisor is not None and "student" in self.supervisor.servers:
                    self.supervisor.set_weights("student", path, str(step))  # before `previous` goes: a restart
                if previous and previous != path:                            # may happen at any moment
                    shutil.rmtree(previous, ignore_errors=True)

                def send():
                    return self.pipeline.student.update_weights(path, str(step))
                if self.supervisor is None:
                    await send()
                else:
                    try:
                        await self.supervisor.retry(send)
                    except ServerFailure as failure:
                        self.pipeline.fail(failure)  # build(step + 1) waits for this version: never
                        raise
                self.pipeline.publish_version(step)
            self.pending = (asyncio.run_coroutine_threadsafe(update(), self.pipeline.loop), path)
        return time.perf_counter() - t0

    def close(self):
        """Rank 0 at the end of the run: the last sync dir is no longer needed (the export is in run_dir/final);
        on /dev/shm it would hold RAM until reboot."""
        if ds.rank() == 0 and self.root.startswith(SHM + os.sep):
            shutil.rmtree(self.root, ignore_errors=True)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
