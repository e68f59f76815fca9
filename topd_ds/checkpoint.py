"""Checkpoints that a crash cannot half-write, and `--resume auto`.

A checkpoint is a directory `run_dir/checkpoints/step-XXXXXXXX/` holding

    ds/            DeepSpeed's own checkpoint (ZeRO shards, optimizer, scheduler), every rank's part
    export/        the consolidated student (`save_pretrained`): loadable by transformers and the servers
    rng_rank{r}.pt each rank's python/numpy/torch RNG states
    state.json     the trainer's loop state (step, counters, eval history)
    manifest.json  size and sha256 of every file above: written last

Everything is written into `.tmp-step-XXXXXXXX/` and renamed once complete, so a directory named `step-*`
either has a manifest or was damaged afterwards; `find_resume` checks the manifest and skips (with a
warning) any checkpoint whose files are missing, truncated or changed, in favour of the previous one.
"""

import hashlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch

from topd_ds.comm import distributed as ds
from topd_ds.errors import CheckpointError
from topd_ds.fsutil import atomic_dir

PREFIX = "step-"


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str):
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel != "manifest.json":
                yield rel, path


def write_manifest(root: str) -> None:
    files = {rel: {"size": os.path.getsize(p), "sha256": _sha256(p)} for rel, p in _files(root)}
    write_json_atomic(os.path.join(root, "manifest.json"), {"files": files})


def verify(root: str) -> str | None:
    """None if the checkpoint at `root` is complete and intact, else the reason it is not."""
    manifest = os.path.join(root, "manifest.json")
    if not os.path.isfile(manifest):
        return "no manifest.json (incomplete write)"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    for rel, meta in files.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return f"missing {rel}"
        if os.path.getsize(path) != meta["size"]:
            return f"{rel} has {os.path.getsize(path)} bytes, manifest says {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{rel} checksum differs from the manifest"
    return None


def list_checkpoints(run_dir: str) -> list:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    return [os.path.join(root, n) for n in names]


def find_resume(run_dir: str, mode: str) -> str | None:
    """`none` -> None; a path -> that checkpoint (verified); `auto` -> the newest intact one, or None."""
    if mode == "none":
        return None
    if mode != "auto":
        reason = verify(mode) if os.path.isdir(mode) else "not a directory"
        if reason:
            raise CheckpointError(f"--resume {mode}: {reason}")
        return mode
    for path in reversed(list_checkpoints(run_dir)):
        reason = verify(path)
        if reason is None:
            return path
        if ds.rank() == 0:
            warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
    return None


def remove_stale(run_dir: str) -> list:
    """Delete what a killed run left half-written in `run_dir` and return the paths removed: `.tmp-*`
    directories (checkpoints, exports) and `*.tmp<pid>` files (`write_json_atomic`) in the run dir and
    checkpoints/, and the whole weight-sync dir `sync/` (student copies only the servers of that run read;
    a new run launches new ones). Call on rank 0 at start-up, before anything is written: one trainer per
    run dir, as everywhere. None of these is ever resumed from (`list_checkpoints` takes `step-*` only)."""
    removed = []
    for parent in (run_dir, os.path.join(run_dir, "checkpoints")):
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            stem, _, pid = name.rpartition(".tmp")
            if name.startswith(".tmp-") or (stem and pid.isdigit()):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
    sync = os.path.join(run_dir, "sync")
    if os.path.isdir(sync):
        shutil.rmtree(sync)
        removed.append(sync)
    return removed


def export_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, "export")


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(engine, run_dir: str, state: dict, tokenizer=None, *, keep: int = 2) -> str:
    """Write a checkpoint of `engine` and `state` (collective); keep the newest `keep` complete ones."""
    name = f"{PREFIX}{state['step']:08d}"
    root = os.path.join(run_dir, "checkpoints")
    final, tmp = os.path.join(root, name), os.path.join(root, ".tmp-" + name)
    if ds.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        engine.save_checkpoint(os.path.join(tmp, "ds"), tag="ds", save_latest=False)
        ds.save_consolidated(engine, export_dir(tmp), tokenizer)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{ds.rank()}.pt"))
        _barrier()
        if ds.rank() == 0:
            write_json_atomic(os.path.join(tmp, "state.json"), {k: v for k, v in state.items() if k != "_dir"})
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if ds.rank() == 0:  # e.g. disk full: drop the partial write, older checkpoints stay intact
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def load(engine, ckpt_dir: str) -> dict:
    """Restore engine, RNG and loop state from `ckpt_dir` (collective). Returns the loop state."""
    load_path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag="ds")
    if load_path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed could not load its checkpoint")
    rng = os.path.join(ckpt_dir, f"rng_rank{ds.rank()}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        state = json.load(f)
    state["_dir"] = ckpt_dir
    return state


def copy_export(run_dir: str, step: int, dest: str) -> str:
    """Copy the export of the checkpoint at `step` to `dest` (temp copy, then rename)."""
    src = export_dir(os.path.join(run_dir, "checkpoints", f"{PREFIX}{step:08d}"))
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no export to copy")
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dest
